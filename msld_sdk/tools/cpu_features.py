"""The CPU's model and the instruction sets that decide int8 speed and int8 correctness.

ONNX Runtime's int8 convolutions multiply uint8 activations by int8 weights (u8s8).  With
VNNI (AVX512-VNNI, AVX-VNNI, AMX) the products are summed in 32 bits (VPDPBUSD): exact.
Without VNNI the kernels use VPMADDUBSW, which adds each *pair* of products into a saturating
16-bit integer: 2 x 255 x 127 = 64770 is cut to 32767.  A plan whose int8 graph has 7-bit
weights (manifest ``int8.reduce_range: true``, |w| <= 64) cannot reach that: 2 x 255 x 64 =
32640, so the fast u8s8 kernels are exact on every x86 CPU and are chosen everywhere.  For an
int8 graph without that mark, a CPU without VNNI gets ONNX Runtime's exact u8u8 kernels
(``session.x64quantprecision=1``), which are slow.

``MSLD_INT8_KERNEL``: ``auto`` (default, as above), ``exact`` (u8u8 on any x86 CPU) or ``fast``
(ONNX Runtime's own u8s8 kernels on any CPU, whatever they do): tests use the last two to
compare a CPU's paths bit for bit.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

from ..errors import UsageError

# /proc/cpuinfo flag -> the name printed in reports
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI",
             "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
EXACT_CONFIG = {"session.x64quantprecision": "1"}
KERNEL_ENV = "MSLD_INT8_KERNEL"


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model", "arch", "isa": {flag: bool} or None when the flags cannot be read}."""
    arch = platform.machine().lower()
    info = {"model": platform.processor() or arch, "arch": arch, "isa": None}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return info
    fields = {}
    for line in lines:  # the first processor's entries are enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info["model"] = fields.get("model name") or info["model"]
    flags = set(fields.get("flags", "").split())
    if flags:
        info["isa"] = {name: name in flags for name in ISA_FLAGS}
    return info


def describe(info: dict | None = None) -> str:
    """One line for logs and bench output, e.g. ``AMD EPYC (x86_64; AVX2, FMA, AVX-512, AVX512-VNNI)``."""
    info = info or cpu_info()
    if info["isa"] is None:
        return f"{info['model']} ({info['arch']}; ISA flags not readable)"
    have = [ISA_FLAGS[f] for f, on in info["isa"].items() if on]
    return f"{info['model']} ({info['arch']}; {', '.join(have) or 'none of ' + '/'.join(ISA_FLAGS.values())})"


def _is_x86(arch: str) -> bool:
    return arch in ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class Int8KernelPath:
    """Which of ONNX Runtime's int8 kernels the SDK asks for, the session settings that do so, and why."""
    name: str
    reason: str
    session_config: dict = field(default_factory=dict)
    # the u8u8 kernels were measured no faster than fp32 (benchmarks/README.md, "int8 per CPU")
    slower_than_fp32: bool = False


def saturation_safe(int8_entry: dict | None) -> bool:
    """Whether a plan's manifest ``int8`` entry marks its graph as unable to saturate 16-bit pair
    sums (7-bit weights, ``reduce_range: true``, written by msld_export.plan_writing.quantize_int8)."""
    return bool(int8_entry) and int8_entry.get("reduce_range") is True


def plan_int8_kernel_path(plan, info: dict | None = None, mode: str | None = None) -> "Int8KernelPath":
    """``int8_kernel_path`` for ``plan``'s int8 graph (its manifest says whether it can saturate)."""
    from ..plan import INT8_KEY
    return int8_kernel_path(info, mode, saturation_safe=saturation_safe(plan.manifest.get(INT8_KEY)))


def int8_kernel_path(info: dict | None = None, mode: str | None = None,
                     saturation_safe: bool = False) -> Int8KernelPath:
    """The int8 kernel path for this CPU (``mode``: "auto", "exact" or "fast"; default from
    $MSLD_INT8_KERNEL) and a plan whose int8 graph is ``saturation_safe`` or not."""
    info = info or cpu_info()
    mode = (mode or os.environ.get(KERNEL_ENV) or "auto").lower()
    if mode not in ("auto", "exact", "fast"):
        raise UsageError(f"{KERNEL_ENV} must be 'auto', 'exact' or 'fast', got {mode!r}")
    if not _is_x86(info["arch"]):
        return Int8KernelPath("default", f"{info['arch']} CPU: ONNX Runtime's x86 u8s8 saturation does not apply")
    if mode == "exact":
        return Int8KernelPath("u8u8-exact", f"{KERNEL_ENV}=exact: ONNX Runtime's u8u8 kernels "
                              "(session.x64quantprecision=1) as on a CPU without VNNI", dict(EXACT_CONFIG),
                              slower_than_fp32=True)
    vnni = [ISA_FLAGS[f] for f in VNNI_FLAGS if (info["isa"] or {}).get(f)]
    if vnni:
        return Int8KernelPath("u8s8-vnni", f"CPU has {vnni[0]}: ONNX Runtime's u8s8 kernels sum in 32 bits (exact)")
    if mode == "fast":
        return Int8KernelPath("u8s8-16bit", f"{KERNEL_ENV}=fast: ONNX Runtime's u8s8 kernels, which on this CPU "
                              "add pairs of products in saturating 16 bits (VPMADDUBSW)"
                              + ("" if saturation_safe else "; this plan's int8 weights can saturate them"))
    if saturation_safe:
        why = "the CPU's instruction sets cannot be read" if info["isa"] is None else "CPU has no VNNI"
        return Int8KernelPath("u8s8-7bit", f"{why}, but this plan's int8 graph has 7-bit weights (manifest "
                              "int8.reduce_range: true, |w| <= 64): a pair of uint8 x int8 products is at most "
                              "2 x 255 x 64 = 32640 <= 32767, so ONNX Runtime's fast u8s8 kernels (VPMADDUBSW) "
                              "cannot saturate and are exact")
    if info["isa"] is None:
        return Int8KernelPath("u8u8-exact", "the CPU's instruction sets cannot be read: ONNX Runtime's exact u8u8 "
                              "kernels (session.x64quantprecision=1), safe on every x86 CPU", dict(EXACT_CONFIG))
    return Int8KernelPath("u8u8-exact", "CPU has no VNNI: ONNX Runtime's u8s8 kernels would saturate 16-bit pair sums "
                          "(VPMADDUBSW) with this plan's 8-bit int8 weights, so session.x64quantprecision=1 selects "
                          "its exact u8u8 kernels; they were measured no faster than fp32 on an AVX-512 CPU (0.86-0.98x; "
                          "1.24-1.44x on an AVX2 one), so fp32 may be the better choice here; re-quantizing the plan "
                          "with msld_export.plan_writing.quantize_int8 gives 7-bit weights, which run the fast u8s8 "
                          "kernels exactly",
                          dict(EXACT_CONFIG), slower_than_fp32=True)
