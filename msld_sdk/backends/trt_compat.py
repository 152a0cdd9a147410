"""The one place that knows how NVIDIA TensorRT (``tensorrt``) and TensorRT for RTX
(``tensorrt_rtx``) differ. Everything else asks this module.

Both expose the same API shape; they differ in build targets (RTX builds ahead of time for named
compute capabilities, full TensorRT for the GPU it runs on), precision (both built strongly
typed from an fp16 graph), the timing cache (not used with RTX) and engine validity checks.
The details are in docs/backends.md. Nothing here imports a TensorRT module at import time;
``load`` does, on request.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import UsageError

log = logging.getLogger("msld_sdk")

FLAVOURS = ("tensorrt", "tensorrt_rtx")
PIP_PACKAGE = {"tensorrt": "tensorrt-cu13", "tensorrt_rtx": "tensorrt-rtx-cu13"}
DISPLAY_NAME = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}


class TensorRTNotInstalled(ImportError):
    """No TensorRT flavour can be imported here."""


# ---- which flavours are present -----------------------------------------------------------------
def installed_flavours() -> list[str]:
    """Flavours whose module can be found (found, not imported: importing takes a second)."""
    out = []
    for name in FLAVOURS:
        try:
            if importlib.util.find_spec(name) is not None:
                out.append(name)
        except (ImportError, ValueError):
            pass
    return out


def install_hint(flavour: str | None = None, version: str | None = None) -> str:
    """The pip command that installs a flavour (at a version, when one is needed)."""
    if flavour is None:
        return f"pip install {PIP_PACKAGE['tensorrt']} cuda-python (or {PIP_PACKAGE['tensorrt_rtx']} for RTX GPUs)"
    pkg = PIP_PACKAGE[flavour] + (f"=={version}" if version else "")
    return f"pip install {pkg} cuda-python"


@dataclass
class Flavour:
    """A loaded TensorRT module and what differs about it."""

    name: str            # "tensorrt" or "tensorrt_rtx"
    trt: ModuleType

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def display(self) -> str:
        return f"{DISPLAY_NAME[self.name]} {self.version}"

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    def logger(self, verbose: bool = False):
        sev = self.trt.Logger.INFO if verbose else self.trt.Logger.WARNING
        return self.trt.Logger(sev)

    # ---- network -------------------------------------------------------------------------------
    def create_network(self, builder):
        """A strongly typed network (precision comes from the graph's types in both flavours)."""
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return builder.create_network(0 if flag is None else 1 << int(flag))

    # ---- compute capabilities ------------------------------------------------------------------
    def supported_targets(self) -> list[str] | None:
        """Compute capabilities this flavour can build for ahead of time; None: only the local GPU."""
        if not self.is_rtx:
            return None
        ccs = []
        for name in dir(self.trt.ComputeCapability):
            m = re.fullmatch(r"SM(\d+)(\d)", name)
            if m:
                ccs.append(f"{int(m.group(1))}.{m.group(2)}")
        return sorted(ccs, key=cc_tuple)

    def default_targets(self) -> list[str]:
        """What a build targets when no --compute-capability is given.

        TensorRT-RTX: every compute capability the release knows except Turing (7.5), which
        NVIDIA leaves out of the default portable set; they are set explicitly so the manifest
        records exactly what was targeted. TensorRT: the local GPU.
        """
        if self.is_rtx:
            return [c for c in self.supported_targets() if cc_tuple(c) >= (8, 0)]
        ccs, reason = gpu_compute_capabilities()
        if not ccs:
            raise RuntimeError(f"{self.display} builds engines on the GPU they will run on, and {reason}; "
                               f"for a build on a machine without a GPU use TensorRT-RTX "
                               f"({install_hint('tensorrt_rtx')})")
        return [ccs[0]]

    def resolve_targets(self, requested: list[str] | None) -> list[str]:
        """Validated, normalised, sorted target list (raises ValueError naming what is wrong)."""
        if not requested:
            return self.default_targets()
        ccs = sorted({format_cc(c) for c in requested}, key=cc_tuple)
        supported = self.supported_targets()
        if supported is None:
            local = self.default_targets()
            if ccs != local:
                raise ValueError(f"{self.display} can only build for the GPU it runs on (compute capability "
                                 f"{local[0]}), not {', '.join(ccs)}: build on such a GPU, or use TensorRT-RTX")
            return ccs
        bad = [c for c in ccs if c not in supported]
        if bad:
            raise ValueError(f"{self.display} cannot target compute capability {', '.join(bad)} (it targets "
                             f"{', '.join(supported)}); build on that GPU with full TensorRT "
                             f"({install_hint('tensorrt')}) instead")
        return ccs

    def set_targets(self, config, ccs: list[str]) -> None:
        """Put the targets into a builder config (TensorRT-RTX only; TensorRT uses the local GPU)."""
        if not self.is_rtx:
            return
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            major, minor = cc_tuple(cc)
            enum = getattr(self.trt.ComputeCapability, f"SM{major}{minor}")
            if not config.set_compute_capability(enum, i):
                raise ValueError(f"{self.display} refused compute capability {cc}")

    # ---- timing cache --------------------------------------------------------------------------
    @property
    def timing_cache_supported(self) -> bool:
        return not self.is_rtx and hasattr(self.trt.IBuilderConfig, "create_timing_cache")

    @property
    def timing_cache_note(self) -> str:
        if self.timing_cache_supported:
            return "used"
        if self.is_rtx:
            return ("not used: TensorRT-RTX does no build-time autotuning (its timing cache API is a "
                    "deprecated no-op that would force a GPU query)")
        return f"not used: {self.display} has no timing cache API"

    def load_timing_cache(self, config, path: Path):
        """Create a timing cache from ``path`` (or empty) and attach it to ``config``; None if unsupported."""
        if not self.timing_cache_supported:
            return None
        data = path.read_bytes() if path.exists() else b""
        cache = config.create_timing_cache(data)
        if cache is None and data:  # damaged or from another version: start afresh
            log.warning("msld_sdk: TensorRT timing cache %s could not be read; starting a new one", path)
            cache = config.create_timing_cache(b"")
        if cache is not None:
            config.set_timing_cache(cache, False)
        return cache

    def save_timing_cache(self, config, path: Path) -> bool:
        if not self.timing_cache_supported:
            return False
        cache = config.get_timing_cache()
        if cache is None:
            return False
        data = bytes(memoryview(cache.serialize()))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True

    # ---- engine checks -------------------------------------------------------------------------
    def engine_validity(self, runtime, data: bytes) -> tuple[bool | None, str]:
        """Header check of a serialized engine where the flavour has one (TensorRT-RTX).

        Returns (True/False, detail), or (None, why) when no check is available. Needs a CUDA
        driver: without a GPU TensorRT-RTX reports every engine invalid, so callers must only
        trust this on a machine with a GPU.
        """
        fn = getattr(runtime, "get_engine_validity", None)
        if fn is None:
            return None, f"{self.display} has no engine validity check"
        validity, diagnostics = fn(data)
        ok = validity != self.trt.EngineValidity.INVALID
        return ok, f"{validity.name} (diagnostics {int(diagnostics):#x})"


def load(flavour: str | None = None) -> Flavour:
    """Import a flavour: the named one, else the best one present.

    With both installed, full TensorRT wins where there is a GPU, TensorRT-RTX where there is
    none (full TensorRT cannot build without a GPU). ``MSLD_TRT_FLAVOUR`` overrides.
    """
    flavour = flavour or os.environ.get("MSLD_TRT_FLAVOUR") or None
    if flavour is not None and flavour not in FLAVOURS:
        raise UsageError(f"TensorRT flavour (flavour= or $MSLD_TRT_FLAVOUR) must be one of {FLAVOURS}, "
                         f"got {flavour!r}")
    present = installed_flavours()
    if flavour is None:
        if not present:
            raise TensorRTNotInstalled(f"no TensorRT module is installed ({install_hint()})")
        if len(present) > 1:
            flavour = "tensorrt" if gpu_compute_capabilities()[0] else "tensorrt_rtx"
        else:
            flavour = present[0]
    elif flavour not in present:
        raise TensorRTNotInstalled(f"{DISPLAY_NAME[flavour]} is not installed ({install_hint(flavour)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            mod = importlib.import_module(flavour)
        except Exception as e:  # a broken install (missing shared libraries) raises OSError and others
            raise TensorRTNotInstalled(f"{DISPLAY_NAME[flavour]} is installed but cannot be imported: {e}") from e
    return Flavour(flavour, mod)


# ---- compute capabilities and GPU probing ------------------------------------------------------
def cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = str(cc).split(".")
    return int(major), int(minor)


def format_cc(cc) -> str:
    """'8.6', '86', 'sm86', 'sm_86' -> '8.6' (ValueError otherwise)."""
    s = str(cc).strip().lower().replace("sm_", "").replace("sm", "")
    m = re.fullmatch(r"(\d+)\.(\d)", s) or re.fullmatch(r"(\d+)(\d)", s)
    if not m:
        raise ValueError(f"not a compute capability: {cc!r} (write it like 8.6)")
    return f"{int(m.group(1))}.{m.group(2)}"


def cc_tag(ccs: list[str]) -> str:
    return "_".join("sm" + c.replace(".", "") for c in ccs)


_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR = 75, 76   # CUdevice_attribute values (cuda.h)


@functools.lru_cache(maxsize=1)
def _probe_gpus() -> tuple[tuple[str, ...], str | None]:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    lib = None
    for n in names:
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError:
            continue
    if lib is None:
        return (), "no GPU found (no NVIDIA driver: libcuda is not present)"
    try:
        rc = lib.cuInit(0)
        if rc != 0:
            return (), f"no GPU found (the NVIDIA driver's cuInit failed with CUDA error {rc})"
        n = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value == 0:
            return (), "no GPU found (the NVIDIA driver reports no device)"
        ccs = []
        for i in range(n.value):
            dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
            lib.cuDeviceGet(ctypes.byref(dev), i)
            lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
            lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
            ccs.append(f"{major.value}.{minor.value}")
        return tuple(ccs), None
    except (AttributeError, OSError) as e:
        return (), f"no GPU found (the NVIDIA driver could not be queried: {e})"


def gpu_compute_capabilities() -> tuple[list[str], str | None]:
    """Compute capabilities of the visible GPUs (device 0 first) and, when there are none, why.

    Asks the NVIDIA driver directly (ctypes, no package needed), so it answers the same
    whether or not TensorRT or cuda-python are installed. Respects CUDA_VISIBLE_DEVICES.
    """
    ccs, reason = _probe_gpus()
    return list(ccs), reason


def cuda_python_runtime():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` on old releases)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def cuda_python_installed() -> bool:
    for name in ("cuda.bindings", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False
