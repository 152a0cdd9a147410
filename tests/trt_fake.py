"""A stand-in for the GPU under TensorRTBackend's own loop code, so that code runs on the CPU.

Host memory plays device memory (``FakeCudart``: malloc, async copies, streams, graph capture
that records the enqueued work and replays it), a toy engine plays TensorRT (``FakeEngine``:
the denoiser's I/O names, dynamic batch profile, execute_async_v3), and the native CPU
functions play the CUDA kernels (``fake_native``). Every copy is bounds-checked against the
allocations. What this cannot show is anything about real TensorRT or CUDA: API versions,
driver behaviour, capture rules; those need a GPU (tests/test_tensorrt_backend.py, gpu_plan).
"""
from __future__ import annotations

import ctypes
import enum
import threading
import types

import numpy as np

from msld_sdk import _native
from msld_sdk.backends import tensorrt_backend as tb


class Err(enum.IntEnum):
    cudaSuccess = 0


class FakeCudart:
    """The cuda-python runtime calls the backend makes, on host memory."""

    cudaStreamNonBlocking = 1

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self):
        self.mem, self.graphs, self.capturing, self.n = {}, {}, None, 0

    def cudaMalloc(self, n):
        a = np.full(n, 0xAB, np.uint8)   # garbage, as device memory is
        self.mem[a.ctypes.data] = a
        return Err.cudaSuccess, a.ctypes.data

    def cudaFree(self, p):
        self.mem.pop(int(p))
        return (Err.cudaSuccess,)

    def _check(self, p, n):
        if not any(b <= p and p + n <= b + a.nbytes for b, a in self.mem.items()):
            raise AssertionError(f"device range {p:#x}+{n} outside every allocation")

    def enqueue(self, fn):
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        K = self.cudaMemcpyKind
        if kind in (K.cudaMemcpyHostToDevice, K.cudaMemcpyDeviceToDevice):
            self._check(int(dst), n)
        if kind in (K.cudaMemcpyDeviceToHost, K.cudaMemcpyDeviceToDevice):
            self._check(int(src), n)
        if kind == K.cudaMemcpyHostToDevice:   # pageable host memory: staged when enqueued
            snap = bytes((ctypes.c_char * n).from_address(int(src)))
            self.enqueue(lambda: ctypes.memmove(int(dst), snap, n))
        else:
            self.enqueue(lambda: ctypes.memmove(int(dst), int(src), n))
        return (Err.cudaSuccess,)

    def cudaStreamCreate(self):
        return Err.cudaSuccess, 7

    def cudaStreamCreateWithFlags(self, flags):
        return Err.cudaSuccess, 9

    def cudaStreamDestroy(self, s):
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, s):
        return (Err.cudaSuccess,)

    def cudaStreamBeginCapture(self, s, mode):
        self.capturing = []
        return (Err.cudaSuccess,)

    def cudaStreamEndCapture(self, s):
        ops, self.capturing = self.capturing, None
        self.n += 1
        self.graphs[self.n] = ops
        return Err.cudaSuccess, self.n

    def cudaGraphInstantiate(self, g, flags):
        return Err.cudaSuccess, ("exec", g)

    def cudaGraphDestroy(self, g):
        return (Err.cudaSuccess,)

    def cudaGraphExecDestroy(self, g):
        return (Err.cudaSuccess,)

    def cudaGraphLaunch(self, g, s):
        for op in self.graphs[g[1]]:
            op()
        return (Err.cudaSuccess,)

    def cudaGetLastError(self):
        return (Err.cudaSuccess,)


CUDART = FakeCudart()


def view(p, n, dt=np.float32):
    dt = np.dtype(dt)
    return np.frombuffer((ctypes.c_char * (n * dt.itemsize)).from_address(int(p)), dt)


def toy_denoiser(x, t, cond):
    """A smooth function of (x, t, cond): enough for trajectories to depend on every input."""
    tt = (t.astype(np.float32) / np.float32(1000.0))[:, None, None, None]
    return np.tanh(np.float32(0.5) * x + np.float32(0.3) * cond - tt).astype(np.float32)


class FakeTrt:
    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    @staticmethod
    def nptype(d):
        return d


class FakeEngine:
    """The denoiser engine's surface: x, t, cond -> eps, batch 1..max_batch."""

    def __init__(self, max_batch, t_dtype):
        self.maxb, self.tdt = max_batch, np.dtype(t_dtype)
        self.names = ["x", "t", "cond", "eps"]
        self.num_io_tensors = 4

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, n):
        return FakeTrt.TensorIOMode.OUTPUT if n == "eps" else FakeTrt.TensorIOMode.INPUT

    def get_tensor_dtype(self, n):
        return self.tdt if n == "t" else np.dtype(np.float32)

    def get_tensor_profile_shape(self, n, p):
        return [None, None, [self.maxb]]

    def create_execution_context(self, *a):
        return FakeContext(self)

    def get_device_memory_size_for_profile_v2(self, p):
        return 64


class FakeContext:
    def __init__(self, e):
        self.e, self.shapes, self.addr = e, {}, {}

    def set_input_shape(self, n, s):
        s = tuple(s)
        if not 1 <= s[0] <= self.e.maxb:
            return False
        self.shapes[n] = s
        return True

    def get_tensor_shape(self, n):
        return self.shapes["x"] if n == "eps" else self.shapes[n]

    def set_tensor_address(self, n, p):
        self.addr[n] = int(p)
        return True

    def set_device_memory(self, p, s):
        pass

    def update_device_memory_size_for_shapes(self):
        return 64

    def execute_async_v3(self, s):
        sh, ad = dict(self.shapes), dict(self.addr)   # bound now, read when the work runs

        def run():
            b = sh["x"][0]
            lat, cn = int(np.prod(sh["x"][1:])), int(np.prod(sh["cond"][1:]))
            x = view(ad["x"], b * lat).reshape(sh["x"])
            t = view(ad["t"], b, self.e.tdt)
            c = view(ad["cond"], b * cn).reshape(sh["cond"])
            view(ad["eps"], b * lat)[:] = toy_denoiser(x, t, c).reshape(-1)
        CUDART.enqueue(run)
        return True


# ---- the CUDA kernels' CPU twins, on fake device memory --------------------------------------------
def cuda_gaussian_dev(seed_p, hyp_begin, n_hyp, n_images, elems, stream, out, s):
    def run():
        seed = int(view(seed_p, 1, np.uint64)[0])
        g = _native.gaussian(seed, hyp_begin, n_hyp, elems, stream).reshape(-1)
        view(out, n_images * n_hyp * elems)[:] = np.tile(g, n_images)
    CUDART.enqueue(run)


def cuda_ddim_step(x, eps, noise, n, at, ap, eta, clip, s):
    def run():
        xv = view(x, n)
        xv[:] = _native.ddim_step(xv.copy(), view(eps, n).copy(), at, ap, eta, None, clip)[0]
    CUDART.enqueue(run)


def cuda_ddim_step_noise_dev(x, eps, at, ap, eta, clip, seed_p, k, n_images, elems, stream, s):
    def run():
        seed, n = int(view(seed_p, 1, np.uint64)[0]), k * n_images * elems
        z = np.tile(_native.gaussian(seed, 0, k, elems, stream).reshape(-1), n_images)
        xv = view(x, n)
        xv[:] = _native.ddim_step(xv.copy(), view(eps, n).copy(), at, ap, eta, z, clip)[0]
    CUDART.enqueue(run)


def cuda_dpmpp2m_step(x, eps, x0p, n, order, at, xc, x0c, x0pc, clip, s):
    def run():
        xv = view(x, n)
        pv = view(x0p, n) if x0p else None
        nx, p2 = _native.dpmpp2m_step(xv.copy(), view(eps, n).copy(), None if pv is None else pv.copy(), order, at,
                                      xc, x0c, x0pc, clip)
        xv[:] = nx
        if pv is not None:
            pv[:] = p2
    CUDART.enqueue(run)


fake_native = types.SimpleNamespace(built_with_cuda=True, cuda_gaussian_dev=cuda_gaussian_dev,
                                    cuda_ddim_step=cuda_ddim_step, cuda_ddim_step_noise_dev=cuda_ddim_step_noise_dev,
                                    cuda_dpmpp2m_step=cuda_dpmpp2m_step)


def make_backend(latent_shape=(2, 4, 4), max_batch=32, t_dtype=np.float32):
    """A TensorRTBackend with its state set as __init__ would, on the fakes above (patch
    ``tensorrt_backend._native`` with ``fake_native`` before sampling)."""
    b = object.__new__(tb.TensorRTBackend)
    b.flavour = types.SimpleNamespace(trt=FakeTrt, is_rtx=False, display="FakeTRT")
    b.cudart, b.stream, b.loop_stream = CUDART, 7, 9
    b.parts = {"denoiser": tb._EnginePart("denoiser", FakeEngine(max_batch, t_dtype), CUDART, 7, FakeTrt)}
    b.latent_shape = b.cond_shape = latent_shape
    b.providers, b.threads, b._buffers, b._lock = [], 1, {}, threading.Lock()
    b._loops, b._loop_lock, b.use_cuda_graph = {}, threading.Lock(), True
    b.last_loop_mode, b._host_reasons = None, set()
    return b
