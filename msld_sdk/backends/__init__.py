"""Backend selection: which engine runs the plan's graphs, and one log line saying why."""
from __future__ import annotations

import logging

from ..errors import BackendUnavailableError
from ..plan import Plan

log = logging.getLogger("msld_sdk")

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def tensorrt_unavailable_reason(plan: Plan) -> str | None:
    """None when the TensorRT backend could run this plan here; else what is missing."""
    engines = plan.manifest.get("engines") or []
    if not engines:
        return "the plan holds no TensorRT engines (add them with `msld build`)"
    return "the TensorRT runtime backend is not part of this build yet"


def select_backend(plan: Plan, backend: str = "auto", threads: int | None = None):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "tensorrt"):
        reason = tensorrt_unavailable_reason(plan)
        if reason is None:  # pragma: no cover - needs a GPU with TensorRT
            raise BackendUnavailableError("TensorRT backend selected but not implemented")
        if backend == "tensorrt":
            raise BackendUnavailableError(f"backend='tensorrt' cannot be used: {reason}; "
                                          "use backend='onnxruntime' or 'auto'")
        log.info("msld_sdk: using ONNX Runtime on the CPU (TensorRT not used: %s)", reason)
    from .onnxruntime_backend import OnnxRuntimeBackend
    b = OnnxRuntimeBackend(plan, threads=threads)
    if backend == "onnxruntime":
        log.info("msld_sdk: using ONNX Runtime (%s, %d threads) as requested", ",".join(b.providers), b.threads)
    return b
