"""TensorRT backend: the plan's engines on an NVIDIA GPU (TensorRT or TensorRT-RTX).

UNVERIFIED ON A GPU: written from the TensorRT / TensorRT-RTX and cuda-python documentation on
a machine without a GPU, this module has never been run, neither the host-driven interface nor
the device-resident loop nor its CUDA-graph capture. On the CPU the tests check only that the
engines are built and stored correctly and that the device loop's step sequence, run with the
CPU twins of the CUDA kernels, gives the CPU loop's latents bit for bit.

``sample`` runs the whole DDIM or DPM-Solver++(2M) loop on the GPU (one CUDA graph per configuration once captured)
and falls back to the shared CPU-driven loop (``host_loop.host_sample``) where it cannot. How
the device loop works, and what to run on a GPU before relying on it: docs/tensorrt_loop.md.
Importing this module needs neither TensorRT nor cuda-python.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from .. import _native
from . import trt_compat
from ..errors import BackendUnavailableError
from ..plan import GRAPH_PARTS, Plan
from ..sampling import Dpm2mStep, Dpm2mTable, SampleOptions, Schedule, StepTable
from .host_loop import DenoiserBuffers, check_sample_args, host_sample

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


def timestep_table(table: StepTable, batch: int, dtype=np.float32) -> np.ndarray:
    """(steps, batch): row i is what the CPU loop writes into t before step i ((float)t)."""
    t = table.timesteps.astype(np.float32)[:, None]
    return np.ascontiguousarray(np.broadcast_to(t, (len(t), batch)).astype(dtype))


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


def _loop_context(engine, flavour):
    """A denoiser execution context of the device loop's own (shapes and addresses never change
    after its first enqueue, as a captured graph requires). Where the API allows: activation
    memory supplied by us (USER_MANAGED, so nothing is allocated inside enqueue; TensorRT-RTX
    asks for it when capturing), and TensorRT-RTX compiling its shape-specialised kernels
    eagerly, on the warm-up enqueue rather than during capture. Returns (context, user_memory)."""
    trt = flavour.trt
    user = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    if flavour.is_rtx and hasattr(engine, "create_runtime_config"):
        cfg = engine.create_runtime_config()
        if user is not None:
            cfg.set_execution_context_allocation_strategy(user)
        eager = getattr(getattr(trt, "DynamicShapesKernelSpecializationStrategy", None), "EAGER", None)
        if eager is not None:
            cfg.dynamic_shapes_kernel_specialization_strategy = eager
        ctx = engine.create_execution_context(cfg)
    elif user is not None:
        ctx = engine.create_execution_context(user)
    else:
        ctx = engine.create_execution_context()
    if ctx is None:
        raise RuntimeError("TensorRT could not create an execution context for the denoiser loop")
    return ctx, user is not None


class _LoopState:
    """Device side of ``sample``'s device loop for one batch size: context, buffers, t tables and graphs."""

    def __init__(self, backend: "TensorRTBackend", batch: int, latent_shape: tuple[int, int, int],
                 cond_shape: tuple[int, int, int] | None = None):
        self.cudart = backend.cudart
        den = backend.parts["denoiser"]
        self.batch, self.elems = batch, int(np.prod(latent_shape))
        self.t_dtype = den.dtypes["t"]
        self._ptrs: list[int] = []
        self.tables: dict[tuple, int] = {}    # schedule key -> device (steps, batch) t table
        self.graphs: dict[tuple, object] = {}  # graph key -> cudaGraphExec_t
        self.no_graph: dict[tuple, str] = {}   # graph key -> why capture failed
        self.context = None
        try:
            self._setup(den, backend.flavour, (batch,) + tuple(latent_shape),
                        (batch,) + tuple(cond_shape or latent_shape))
        except BaseException:
            self.free()
            raise

    def _setup(self, den, flavour, shape: tuple, cond_shape: tuple) -> None:
        self.context, user_memory = _loop_context(den.engine, flavour)
        lat, cnd = int(np.prod(shape)) * 4, int(np.prod(cond_shape)) * 4
        self.x, self.eps = (self._malloc(lat) for _ in range(2))
        self.x0_prev = 0   # DPM-Solver++(2M)'s previous x0: allocated on its first use (x0_prev_buffer)
        self.cond, self.cond_img = (self._malloc(cnd) for _ in range(2))
        self.t = self._malloc(self.batch * self.t_dtype.itemsize)
        self.seed = self._malloc(8)
        # every input shape is set before the first enqueue and never changes for this context
        for name, shp in (("x", shape), ("cond", cond_shape), ("t", (self.batch,))):
            if not self.context.set_input_shape(name, shp):
                raise ValueError(f"denoiser engine rejects input {name} of shape {shp}")
        if tuple(self.context.get_tensor_shape("eps")) != shape:
            raise ValueError(f"denoiser engine gives eps of shape {tuple(self.context.get_tensor_shape('eps'))}, "
                             f"expected {shape}")
        if user_memory:
            size = int(self.context.update_device_memory_size_for_shapes()
                       if hasattr(self.context, "update_device_memory_size_for_shapes")
                       else den.engine.get_device_memory_size_for_profile_v2(0))
            self.context.set_device_memory(self._malloc(size), size)  # cudaMalloc: 256-byte aligned
        for name in ("x", "t", "cond", "eps"):
            if not self.context.set_tensor_address(name, getattr(self, name)):
                raise RuntimeError(f"denoiser engine refused the address of {name}")

    def x0_prev_buffer(self) -> int:
        """The one extra latent-sized buffer DPM-Solver++(2M) needs (allocated once, outside capture)."""
        if not self.x0_prev:
            self.x0_prev = self._malloc(self.batch * self.elems * 4)
        return self.x0_prev

    def _malloc(self, nbytes: int) -> int:
        p = int(_cuda_call(self.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))
        self._ptrs.append(p)
        return p

    def table(self, steps: StepTable, stream) -> int:
        """Device copy of ``timestep_table`` for these steps (uploaded on first use only)."""
        key = steps.key()
        ptr = self.tables.get(key)
        if ptr is None:
            host = timestep_table(steps, self.batch, self.t_dtype)
            ptr = self._malloc(host.nbytes)
            cudart = self.cudart
            _cuda_call(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "t table upload")
            _cuda_call(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            self.tables[key] = ptr
        return ptr

    def free(self) -> None:
        for g in self.graphs.values():
            self.cudart.cudaGraphExecDestroy(g)
        self.graphs.clear()
        self.context = None  # before the memory it uses
        for p in self._ptrs:
            self.cudart.cudaFree(p)
        self._ptrs.clear()


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
            # the device loop's own stream: nothing else is ever enqueued on it, so a capture records
            # only the loop; non-blocking: no implicit syncs with the legacy default stream
            self.loop_stream = _cuda_call(self.cudart.cudaStreamCreateWithFlags(
                getattr(self.cudart, "cudaStreamNonBlocking", 1)), "cudaStreamCreateWithFlags")
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
        self.latent_shape, self.cond_shape = plan.latent_shape, plan.condition_shape
        self.providers = [f"{self.flavour.display} ({entry['key']})"]
        self.threads = 1
        self._buffers: dict[tuple[int, int], DenoiserBuffers] = {}
        self._lock = threading.Lock()
        self._loops: dict[tuple, _LoopState] = {}  # device-loop state per (batch, latent shape)
        self._loop_lock = threading.Lock()         # one device loop at a time (shared buffers)
        self.use_cuda_graph = True                 # False: the device loop neither captures nor replays graphs
        self.last_loop_mode: str | None = None     # "graph", "steps" or "host" (diagnostics)
        self._host_reasons: set[str] = set()       # why sample fell back to the host loop (logged once)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """B x C x H x W normalised image -> B x c x h x w image latent."""
        return self.parts["encoder"]({"image": image})["latent"]

    def buffers(self, batch: int) -> DenoiserBuffers:
        """Host buffers for this batch size, one set per thread (as in the ONNX Runtime backend)."""
        key = (threading.get_ident(), batch)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = DenoiserBuffers(batch, self.latent_shape, self.cond_shape)
            return buf

    def denoise_bound(self, buf: DenoiserBuffers) -> None:
        """One denoiser call: copies x, t, cond to the GPU, runs, copies eps back into buf.eps."""
        self.parts["denoiser"].run({"x": buf.x, "t": buf.t, "cond": buf.cond}, {"eps": buf.eps})

    # ---- sampling: the device-resident DDIM loop, or the CPU-driven one ---------------------------
    def sample(self, cond: np.ndarray, n_images: int, options: SampleOptions, schedule: Schedule,
               initial_latents: np.ndarray | None = None, cond_per_hypothesis: bool = False,
               progress=None, timings: dict | None = None) -> np.ndarray:
        """The whole DDIM loop (``msld_ddim_sample``) for ``cond`` (n_images, C, h, w), the
        encoder's output: returns the final latents (n_images * k, C, h, w) float32, laid out
        [image][hypothesis] and equal to the CPU loop's up to the denoiser's arithmetic.
        ``initial_latents`` (n_images * k, C, h, w) float32, if given, replaces the drawn noise.
        ``cond_per_hypothesis``: ``cond`` has one row per hypothesis (n_images * k, laid out like
        the latents; test-time views, ``msld_sdk.views``) instead of one per image. On the GPU
        ``progress(steps, steps)`` is called once at the end and ``timings`` is left as it is;
        the CPU-driven fallback behaves as ``host_loop.host_sample``."""
        cond = np.ascontiguousarray(cond, dtype=np.float32)
        check_sample_args(cond, n_images, options, cond_per_hypothesis, initial_latents, self.latent_shape)
        k = options.k
        den = self.parts["denoiser"]
        group = den.max_batch // k  # whole images per denoiser batch
        why = (f"k={k} is above the denoiser engine's batch maximum {den.max_batch} (the eta-noise kernel "
               "cannot split an image's hypotheses)" if group < 1 else
               "msld_sdk._native was built without the CUDA kernels" if not getattr(_native, "built_with_cuda", False)
               else "the denoiser engine's x/cond/eps are not float32"
               if any(den.dtypes.get(n) != np.dtype(np.float32) for n in ("x", "cond", "eps")) else None)
        if why is not None:
            if why not in self._host_reasons:
                self._host_reasons.add(why)
                log.info("msld_sdk: TensorRT DDIM loop driven from the CPU (%s)", why)
            self.last_loop_mode = "host"
            return host_sample(self, cond, n_images, options, schedule, initial_latents, cond_per_hypothesis,
                               progress, timings)
        steps = schedule.table(options.solver, options.steps, options.timesteps)
        out = np.empty((n_images * k,) + tuple(self.latent_shape), np.float32)
        for start in range(0, n_images, group):
            m = min(group, n_images - start)
            init = None if initial_latents is None else \
                np.ascontiguousarray(initial_latents[start * k:(start + m) * k], np.float32)
            c = cond[start * k:(start + m) * k] if cond_per_hypothesis else cond[start:start + m]
            self._device_loop(c, k, steps, float(options.eta), schedule.clip, int(options.seed),
                              out[start * k:(start + m) * k], init, cond_per_hypothesis)
        if progress is not None:
            progress(options.steps, options.steps)
        return out

    def _device_loop(self, cond: np.ndarray, k: int, steps: StepTable, eta: float, clip: float, seed: int,
                     out: np.ndarray, initial_latents: np.ndarray | None = None,
                     cond_per_hypothesis: bool = False) -> None:
        cudart, stream = self.cudart, self.loop_stream
        s = int(stream)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        n, per = cond.shape[0] // (k if cond_per_hypothesis else 1), cond[0].nbytes
        with self._loop_lock:
            st = self._loops.get((n * k, cond.shape[1:]))
            if st is None:
                st = self._loops[(n * k, cond.shape[1:])] = _LoopState(self, n * k, self.latent_shape, cond.shape[1:])
            table = st.table(steps, stream)
            if isinstance(steps, Dpm2mTable):
                st.x0_prev_buffer()
            # this call's inputs: seed word, cond (up once, then k copies per image on the device),
            # initial latents (Philox stream 0, hypotheses 0..k-1 for every image)
            seed_host = np.array([seed], np.uint64)  # pageable H2D copies are staged before the call returns
            _cuda_call(cudart.cudaMemcpyAsync(st.seed, seed_host.ctypes.data, 8, h2d, stream), "seed upload")
            if cond_per_hypothesis:   # one row per hypothesis already: straight into the denoiser's input
                _cuda_call(cudart.cudaMemcpyAsync(st.cond, cond.ctypes.data, cond.nbytes, h2d, stream), "cond upload")
            else:
                _cuda_call(cudart.cudaMemcpyAsync(st.cond_img, cond.ctypes.data, cond.nbytes, h2d, stream),
                           "cond upload")
                for b in range(n):
                    for j in range(k):
                        _cuda_call(cudart.cudaMemcpyAsync(st.cond + (b * k + j) * per, st.cond_img + b * per, per,
                                                          d2d, stream), "cond repeat")
            if initial_latents is None:
                _native.cuda_gaussian_dev(st.seed, 0, k, n, st.elems, 0, st.x, s)
            else:  # given initial latents replace Philox stream 0
                _cuda_call(cudart.cudaMemcpyAsync(st.x, initial_latents.ctypes.data, initial_latents.nbytes, h2d,
                                                  stream), "initial latents upload")
            key = (k, n, eta, clip) + steps.key()
            graph = st.graphs.get(key) if self.use_cuda_graph else None
            if graph is not None:
                _cuda_call(cudart.cudaGraphLaunch(graph, stream), "cudaGraphLaunch")
                self.last_loop_mode = "graph"
            else:
                self._enqueue_steps(st, table, steps, k, n, eta, clip)
                self.last_loop_mode = "steps"
            _cuda_call(cudart.cudaMemcpyAsync(out.ctypes.data, st.x, out.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "latents D2H")
            _cuda_call(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            if graph is None and self.use_cuda_graph and key not in st.no_graph:
                # the steps just run were the warm-up enqueue; capture them for the next calls
                graph, why = self._capture(st, table, steps, k, n, eta, clip)
                if graph is None:
                    st.no_graph[key] = why
                    log.warning("msld_sdk: CUDA graph capture of the TensorRT DDIM loop failed (%s); "
                                "running it step by step", why)
                else:
                    st.graphs[key] = graph

    def _enqueue_steps(self, st: _LoopState, table: int, steps: StepTable, k: int, n: int, eta: float,
                       clip: float) -> None:
        """Enqueue every step on the stream (no host copy, no sync): t <- row i of the table,
        denoiser, fused DDIM update in place on x (eta noise generated in the kernel), or the fused
        DPM-Solver++(2M) update (``steps`` a ``Dpm2mTable``; the previous x0 kept in ``st.x0_prev``)."""
        cudart, stream = self.cudart, self.loop_stream
        s = int(stream)
        d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        row = st.batch * st.t_dtype.itemsize
        for c in steps:
            _cuda_call(cudart.cudaMemcpyAsync(st.t, table + c.index * row, row, d2d, stream), "t copy")
            if not st.context.execute_async_v3(s):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for the denoiser (step {c.index})")
            if isinstance(c, Dpm2mStep):
                _native.cuda_dpmpp2m_step(st.x, st.eps, st.x0_prev, st.batch * st.elems, c.order, c.alpha_t, c.x_coef,
                                          c.x0_coef, c.x0_prev_coef, clip, s)
            elif eta > 0.0:
                _native.cuda_ddim_step_noise_dev(st.x, st.eps, c.alpha_t, c.alpha_prev, eta, clip, st.seed, k, n,
                                                 st.elems, c.noise_stream, s)
            else:
                _native.cuda_ddim_step(st.x, st.eps, 0, st.batch * st.elems, c.alpha_t, c.alpha_prev, 0.0, clip, s)

    def _capture(self, st: _LoopState, table: int, steps: StepTable, k: int, n: int, eta: float,
                 clip: float):
        """Capture ``_enqueue_steps`` into an instantiated CUDA graph: (graph exec, None) or (None, why)."""
        cudart, stream = self.cudart, self.loop_stream
        capturable = getattr(st.context, "is_stream_capturable", None)
        if capturable is not None and not capturable(int(stream)):
            return None, (f"{self.flavour.display} reports the denoiser context cannot be captured on this stream"
                          + (" (engines need the REQUIRE_USER_ALLOCATION build flag)" if self.flavour.is_rtx else ""))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            _cuda_call(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        except RuntimeError as e:
            return None, str(e)
        failed = None
        try:
            self._enqueue_steps(st, table, steps, k, n, eta, clip)
        except Exception as e:  # noqa: BLE001 - any failure inside capture means: no graph
            failed = f"{type(e).__name__}: {e}"
        err, graph = cudart.cudaStreamEndCapture(stream)  # always end, even after a failure
        if failed is None and int(err) != 0:
            failed = f"cudaStreamEndCapture: {getattr(err, 'name', err)}"
        try:
            if failed is None:
                err, exe = cudart.cudaGraphInstantiate(graph, 0)
                if int(err) != 0:
                    failed = f"cudaGraphInstantiate: {getattr(err, 'name', err)}"
        finally:
            if graph is not None and int(graph) != 0:
                cudart.cudaGraphDestroy(graph)  # the executable graph does not need it
        if failed is not None:
            cudart.cudaGetLastError()  # leave no error behind for the step-by-step runs
            return None, failed
        return exe, None

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """N x c x h x w latents -> N x 1 x H x W foreground probabilities."""
        return self.parts["decoder"]({"z": latents})["prob"]

    def close(self) -> None:
        for st in getattr(self, "_loops", {}).values():
            st.free()
        getattr(self, "_loops", {}).clear()
        for p in getattr(self, "parts", {}).values():
            p.free()
        for name in ("stream", "loop_stream"):
            if getattr(self, name, None) is not None:
                self.cudart.cudaStreamDestroy(getattr(self, name))
                setattr(self, name, None)

    def __del__(self):  # best effort; the process exit frees everything anyway
        try:
            self.close()
        except Exception:
            pass
