"""Backend selection: which engine runs the plan's graphs, and one log line saying why.

``auto`` uses TensorRT when the plan holds an engine set for this GPU (same TensorRT flavour
and version, a targeted compute capability, built from the plan's current graphs) and a GPU,
a TensorRT module and cuda-python are present; otherwise ONNX Runtime on the CPU. An explicit
``tensorrt`` that cannot be honoured raises ``BackendUnavailableError`` naming everything
that is missing and how to fix it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import trt_compat
from ..errors import BackendUnavailableError, UsageError
from ..plan import GRAPH_PARTS, Plan

log = logging.getLogger("msld_sdk")

BACKENDS = ("auto", "onnxruntime", "tensorrt")
_ENTRY_KEYS = ("key", "flavour", "version", "compute_capabilities", "blobs")


@dataclass
class TensorRTCheck:
    """Whether TensorRT can run a plan here: the engine set and flavour to use, or the problems."""

    problems: list[str] = field(default_factory=list)
    entry: dict | None = None
    flavour: str | None = None
    gpu_cc: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.entry is not None


def engine_sets(plan: Plan) -> list[dict]:
    """The manifest's engine entries that are complete (every part's blob present)."""
    out = []
    for e in plan.manifest.get("engines") or []:
        if not isinstance(e, dict) or not all(k in e for k in _ENTRY_KEYS) or not isinstance(e["blobs"], dict):
            continue
        if all(e["blobs"].get(p) in plan.manifest["blobs"] for p in GRAPH_PARTS):
            out.append(e)
    return out


def _flavour_version(name: str) -> str:
    """Version of an installed flavour (imports it; raises TensorRTNotInstalled if broken)."""
    return trt_compat.load(name).version


def match_engine_set(plan: Plan, entries: list[dict], installed: dict[str, str], cc: str) -> tuple[dict | None, str | None]:
    """Pick the engine set for ``installed`` flavours ({name: version}) and a GPU of compute
    capability ``cc``. Returns (entry, None) or (None, why not, with the fix)."""
    build = f"`msld build {plan.path}`"
    graphs = {p: plan.manifest["blobs"][p]["sha256"] for p in GRAPH_PARTS}
    why = []
    for name in trt_compat.FLAVOURS:        # full TensorRT first where both could run
        if name not in installed:
            continue
        version, display = installed[name], trt_compat.DISPLAY_NAME[name]
        mine = [e for e in entries if e["flavour"] == name]
        if not mine:
            continue
        same = [e for e in mine if e["version"] == version]
        if not same:
            built = ", ".join(sorted({str(e["version"]) for e in mine}))
            why.append(f"the plan's {display} engines were built with version {built}, installed is {version} "
                       f"(engines only run on the version that built them): rebuild with {build}, or "
                       f"{trt_compat.install_hint(name, sorted({str(e['version']) for e in mine})[-1])}")
            continue
        fresh = [e for e in same if not isinstance(e.get("source_sha256"), dict) or e["source_sha256"] == graphs]
        if not fresh:
            why.append(f"the plan's {display} engines were built from other graphs than the ones it now holds: "
                       f"rebuild with {build}")
            continue
        for e in fresh:
            if cc in [str(c) for c in e["compute_capabilities"]]:
                return e, None
        have = ", ".join(sorted({str(c) for e in fresh for c in e["compute_capabilities"]}, key=trt_compat.cc_tuple))
        if name == "tensorrt_rtx" and not _rtx_can_target(cc):
            why.append(f"no engine for compute capability {cc} (the plan's {display} engines target {have}, and "
                       f"{display} cannot target {cc}): install full TensorRT "
                       f"({trt_compat.install_hint('tensorrt')}) and run {build} on this GPU")
        else:
            why.append(f"no engine for compute capability {cc} (the plan's {display} engines target {have}): "
                       f"rebuild with `msld build {plan.path} --compute-capability {cc}`")
    if not why:
        flavours = sorted({e["flavour"] for e in entries})
        why.append(f"the plan's engines are for {', '.join(flavours)}, which is not installed "
                   f"({'; '.join(trt_compat.install_hint(f) for f in flavours if f in trt_compat.FLAVOURS)})")
    return None, "; ".join(why)


def _rtx_can_target(cc: str) -> bool:
    try:
        targets = trt_compat.load("tensorrt_rtx").supported_targets()
    except (trt_compat.TensorRTNotInstalled, ValueError):
        return True
    return targets is None or cc in targets


def tensorrt_check(plan: Plan, first_only: bool = True) -> TensorRTCheck:
    """What stands between this plan and the TensorRT backend here (cheap checks first;
    ``first_only`` stops at the first problem, which is what ``auto`` needs)."""
    chk = TensorRTCheck()
    entries = engine_sets(plan)
    if not entries:
        chk.problems.append(f"the plan holds no TensorRT engines (build them with `msld build {plan.path}`)")
        if first_only:
            return chk
    ccs, no_gpu = trt_compat.gpu_compute_capabilities()
    if not ccs:
        chk.problems.append(no_gpu or "no GPU found")
        if first_only:
            return chk
    else:
        chk.gpu_cc = ccs[0]
    wanted = sorted({e["flavour"] for e in entries if e["flavour"] in trt_compat.FLAVOURS}) or list(trt_compat.FLAVOURS)
    present = [f for f in trt_compat.installed_flavours() if f in wanted]
    if not present:
        if entries:
            hints = "; ".join(trt_compat.install_hint(f, sorted({str(e["version"]) for e in entries
                                                                  if e["flavour"] == f})[-1]) for f in wanted)
            chk.problems.append(f"no TensorRT module for the plan's engines is installed ({hints})")
        else:
            chk.problems.append(f"no TensorRT module is installed ({trt_compat.install_hint()})")
        if first_only:
            return chk
    if not trt_compat.cuda_python_installed():
        chk.problems.append("cuda-python is not installed (pip install cuda-python)")
        if first_only:
            return chk
    if entries and ccs and present:
        installed = {}
        for f in present:
            try:
                installed[f] = _flavour_version(f)
            except trt_compat.TensorRTNotInstalled as e:
                chk.problems.append(str(e))
        if installed:
            entry, why = match_engine_set(plan, entries, installed, chk.gpu_cc)
            if entry is None:
                chk.problems.append(why)
            else:
                chk.entry, chk.flavour = entry, entry["flavour"]
    return chk


def tensorrt_unavailable_reason(plan: Plan) -> str | None:
    """None when the TensorRT backend could run this plan here; else what is missing first."""
    chk = tensorrt_check(plan, first_only=True)
    return None if chk.ok else (chk.problems[0] if chk.problems else "no usable TensorRT engine set")


def _onnxruntime(plan: Plan, threads: int | None, precision: str = "fp32"):
    from .onnxruntime_backend import OnnxRuntimeBackend
    return OnnxRuntimeBackend(plan, threads=threads, precision=precision)


def select_backend(plan: Plan, backend: str = "auto", threads: int | None = None, precision: str = "fp32"):
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
    plan.denoiser_blob(precision)  # the plan has it (else PrecisionUnavailableError naming the fix)
    if precision != "fp32":
        # int8 is an ONNX Runtime (CPU) path; msld build makes fp16 TensorRT engines only
        if backend == "tensorrt":
            raise BackendUnavailableError(f"precision={precision!r} runs on ONNX Runtime only (msld build makes fp16 "
                                          "TensorRT engines); use backend='onnxruntime' or precision='fp32'")
        b = _onnxruntime(plan, threads, precision)
        log.info("msld_sdk: using ONNX Runtime (%s, %d threads) with the %s denoiser%s", ",".join(b.providers),
                 b.threads, precision, "; TensorRT not considered for int8" if backend == "auto" else "")
        return b
    if backend in ("auto", "tensorrt"):
        chk = tensorrt_check(plan, first_only=backend == "auto")
        if chk.ok:
            try:
                from .tensorrt_backend import TensorRTBackend
                b = TensorRTBackend(plan, chk.entry)
            except Exception as e:   # a driver or CUDA failure too (cuda-python raises RuntimeError)
                if not isinstance(e, BackendUnavailableError):
                    e = BackendUnavailableError(f"the TensorRT backend failed to start: {type(e).__name__}: {e}")
                if backend == "tensorrt":
                    raise e
                log.warning("msld_sdk: using ONNX Runtime on the CPU (TensorRT not used: %s)", e)
                return _onnxruntime(plan, threads)
            if threads is not None:
                log.info("msld_sdk: threads=%s applies to ONNX Runtime only; TensorRT runs on the GPU", threads)
            log.info("msld_sdk: using %s on the GPU (compute capability %s, engine set %s)%s",
                     b.flavour.display, chk.gpu_cc, chk.entry["key"],
                     " as requested" if backend == "tensorrt" else "")
            return b
        reason = "; ".join(chk.problems) or "no usable TensorRT engine set"
        if backend == "tensorrt":
            raise BackendUnavailableError(f"backend='tensorrt' cannot be used: {reason}; "
                                          "or use backend='onnxruntime' or 'auto'")
        log.info("msld_sdk: using ONNX Runtime on the CPU (TensorRT not used: %s)", reason)
    b = _onnxruntime(plan, threads)
    if backend == "onnxruntime":
        log.info("msld_sdk: using ONNX Runtime (%s, %d threads) as requested", ",".join(b.providers), b.threads)
    return b
