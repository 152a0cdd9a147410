"""TensorRT backend: the plan's engines on an NVIDIA GPU (TensorRT or TensorRT-RTX).

UNVERIFIED ON A GPU. This module was written from the TensorRT / TensorRT-RTX and
cuda-python API documentation on a machine without a GPU; it has never been run. What is
verified on the CPU is only that the engines it loads are built and stored correctly
(``tests/test_engine_build.py``). Run ``tests/test_backend_selection.py`` on a GPU machine
(its GPU tests are skipped elsewhere) before relying on it.

Same interface as the ONNX Runtime backend: ``encode``, ``buffers(batch)`` (host numpy
x/t/cond/eps for the CPU-driven native DDIM loop), ``denoise_bound(buf)`` and ``decode``.
Each engine gets one execution context; device buffers are allocated once per batch size
(cuda-python ``cudaMalloc``), bound with ``set_input_shape`` / ``set_tensor_address`` and
run with ``execute_async_v3`` on one CUDA stream. The denoiser's host buffers are copied to
the device before and back after every call for now (the DDIM loop runs on the CPU);
a device-resident loop is future work. Batches above an engine's profile maximum are run in
chunks.

Imported lazily by ``backends.select_backend``; importing it needs neither TensorRT nor
cuda-python (they are loaded when a backend is constructed).
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from .. import trt_compat
from ..errors import BackendUnavailableError
from ..plan import GRAPH_PARTS, Plan

log = logging.getLogger("msld_sdk")


def _cuda_call(result, what: str):
    """cuda-python calls return (cudaError_t, *values): raise on error, return the values."""
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if int(err) != 0:
        raise RuntimeError(f"CUDA error in {what}: {getattr(err, 'name', err)} ({int(err)})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


class _EnginePart:
    """One engine, its execution context and its device buffers (one set per batch size)."""

    def __init__(self, name: str, engine, cudart, stream, trt):
        self.name = name
        self.engine = engine
        self.cudart = cudart
        self.stream = stream
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailableError(f"TensorRT could not create an execution context for the {name} engine")
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in io}
        # profile 0 is the only one; its max batch bounds each chunk
        self.max_batch = min(int(engine.get_tensor_profile_shape(n, 0)[2][0]) for n in self.inputs)
        self._device: dict[int, dict[str, int]] = {}
        self._out_shapes: dict[int, dict[str, tuple]] = {}
        self._lock = threading.Lock()

    def _bind(self, batch: int, shapes: dict[str, tuple]) -> dict[str, int]:
        """Set this batch's input shapes and tensor addresses (allocating on first use)."""
        for n in self.inputs:
            if not self.context.set_input_shape(n, (batch,) + tuple(shapes[n][1:])):
                raise ValueError(f"{self.name} engine rejects input {n} of shape {(batch,) + tuple(shapes[n][1:])}")
        ptrs = self._device.get(batch)
        if ptrs is None:
            ptrs, outs = {}, {}
            for n in self.inputs + self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                if n in self.outputs:
                    outs[n] = shape
                nbytes = int(np.prod(shape)) * self.dtypes[n].itemsize
                ptrs[n] = int(_cuda_call(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._device[batch], self._out_shapes[batch] = ptrs, outs
        for n, p in ptrs.items():
            self.context.set_tensor_address(n, p)
        return ptrs

    def output_shapes(self, batch: int, shapes: dict[str, tuple]) -> dict[str, tuple]:
        with self._lock:
            self._bind(min(batch, self.max_batch), shapes)
            per = self._out_shapes[min(batch, self.max_batch)]
        return {n: (batch,) + tuple(s[1:]) for n, s in per.items()}

    def run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """inputs -> outputs (host arrays, outputs preallocated, C-contiguous), chunked by batch."""
        cudart = self.cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        n = next(iter(inputs.values())).shape[0]
        shapes = {k: v.shape for k, v in inputs.items()}
        with self._lock:
            for start in range(0, n, self.max_batch):
                b = min(self.max_batch, n - start)
                ptrs = self._bind(b, shapes)
                keep = []  # host chunks must live until the stream is synchronised
                for name in self.inputs:
                    host = np.ascontiguousarray(inputs[name][start:start + b], dtype=self.dtypes[name])
                    keep.append(host)
                    _cuda_call(cudart.cudaMemcpyAsync(ptrs[name], host.ctypes.data, host.nbytes, h2d, self.stream),
                               "cudaMemcpyAsync H2D")
                if not self.context.execute_async_v3(int(self.stream)):
                    raise RuntimeError(f"TensorRT execute_async_v3 failed for the {self.name} engine")
                for name in self.outputs:
                    host = outputs[name][start:start + b]
                    if not host.flags.c_contiguous or host.dtype != self.dtypes[name]:
                        raise ValueError(f"{self.name} output {name}: need a C-contiguous {self.dtypes[name]} array")
                    _cuda_call(cudart.cudaMemcpyAsync(host.ctypes.data, ptrs[name], host.nbytes, d2h, self.stream),
                               "cudaMemcpyAsync D2H")
                _cuda_call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
                del keep

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(inputs.values())).shape[0]
        outs = {k: np.empty(s, self.dtypes[k]) for k, s in self.output_shapes(n, {k: v.shape for k, v in inputs.items()}).items()}
        self.run(inputs, outs)
        return outs

    def free(self) -> None:
        for ptrs in self._device.values():
            for p in ptrs.values():
                self.cudart.cudaFree(p)
        self._device.clear()


class DenoiserBuffers:
    """Host memory of one denoiser batch size (the native loop writes x and t, reads eps)."""

    def __init__(self, batch: int, latent_shape: tuple[int, int, int]):
        c, h, w = latent_shape
        self.x = np.zeros((batch, c, h, w), np.float32)
        self.eps = np.zeros((batch, c, h, w), np.float32)
        self.t = np.zeros((batch,), np.float32)
        self.cond = np.zeros((batch, c, h, w), np.float32)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, plan: Plan, entry: dict):
        try:
            self.flavour = trt_compat.load(entry["flavour"])
        except trt_compat.TensorRTNotInstalled as e:
            raise BackendUnavailableError(str(e)) from e
        try:
            self.cudart = trt_compat.cuda_python_runtime()
        except ImportError as e:
            raise BackendUnavailableError(f"cuda-python is not installed ({e}): pip install cuda-python") from e
        trt = self.flavour.trt
        self.entry = entry
        self.logger = self.flavour.logger()
        self.runtime = trt.Runtime(self.logger)
        try:
            self.stream = _cuda_call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        except RuntimeError as e:
            raise BackendUnavailableError(f"cannot create a CUDA stream: {e}") from e
        self.parts: dict[str, _EnginePart] = {}
        for part in GRAPH_PARTS:
            data = plan.blob(entry["blobs"][part])
            ok, detail = self.flavour.engine_validity(self.runtime, data)
            if ok is False:
                raise BackendUnavailableError(f"the {part} engine of set {entry['key']} is not valid on this system "
                                              f"({detail}): rebuild with `msld build {plan.path}`")
            engine = self.runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BackendUnavailableError(f"{self.flavour.display} could not load the {part} engine of set "
                                              f"{entry['key']} (see the messages above): rebuild with "
                                              f"`msld build {plan.path}`")
            self.parts[part] = _EnginePart(part, engine, self.cudart, self.stream, trt)
        lat = plan.manifest["latent"]
        self.latent_shape = (int(lat["channels"]), int(lat["size"][0]), int(lat["size"][1]))
        self.providers = [f"{self.flavour.display} ({entry['key']})"]
        self.threads = 1
        self._buffers: dict[tuple[int, int], DenoiserBuffers] = {}
        self._lock = threading.Lock()

    def encode(self, image: np.ndarray) -> np.ndarray:
        """B x C x H x W normalised image -> B x c x h x w image latent."""
        return self.parts["encoder"]({"image": image})["latent"]

    def buffers(self, batch: int) -> DenoiserBuffers:
        """Host buffers for this batch size, one set per thread (as in the ONNX Runtime backend)."""
        key = (threading.get_ident(), batch)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = DenoiserBuffers(batch, self.latent_shape)
            return buf

    def denoise_bound(self, buf: DenoiserBuffers) -> None:
        """One denoiser call: copies x, t, cond to the GPU, runs, copies eps back into buf.eps."""
        self.parts["denoiser"].run({"x": buf.x, "t": buf.t, "cond": buf.cond}, {"eps": buf.eps})

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """N x c x h x w latents -> N x 1 x H x W foreground probabilities."""
        return self.parts["decoder"]({"z": latents})["prob"]

    def close(self) -> None:
        for p in getattr(self, "parts", {}).values():
            p.free()
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):  # best effort; the process exit frees everything anyway
        try:
            self.close()
        except Exception:
            pass
