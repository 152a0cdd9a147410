"""ONNX Runtime backend: the plan's three graphs on the CPU (or any ORT execution provider).

``sample`` is the CPU-driven native loop (``host_loop.host_sample``); the denoiser runs through
I/O binding on buffers allocated once per batch size: the loop updates ``x`` in place, ORT reads
``x``, ``t`` and ``cond`` and writes ``eps`` into preallocated memory, so nothing is copied or
allocated between steps.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import onnxruntime as ort

from ..tools.cpu_features import plan_int8_kernel_path
from ..plan import Plan
from ..sampling import SampleOptions, Schedule
from .host_loop import DenoiserBuffers, host_sample

log = logging.getLogger("msld_sdk")


def session_options(threads: int | None = None, config: dict | None = None) -> ort.SessionOptions:
    """The SDK's ONNX Runtime session settings, shared by its three sessions (and by the
    per-hypothesis baseline, so that benchmarks compare batching, not settings).

    ``session.force_spinning_stop``: each session has its own intra-op thread pool, and by
    default its threads keep spinning after ``run`` returns.  The encoder, denoiser and
    decoder run one after another on the same cores, so the previous session's spinning
    threads took CPU from the next one.  Stopping the spin when a run returns removes that
    without a process-wide thread pool (measured: docs/performance.md).

    ``config``: further session config entries (the int8 kernel choice, see cpu_features)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or _physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.log_severity_level = 3
    return opts


def _physical_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, plan: Plan, threads: int | None = None, providers=None, precision: str = "fp32",
                 int8_kernel_mode: str | None = None):
        opts = session_options(threads)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = opts.intra_op_num_threads
        self.encoder = ort.InferenceSession(plan.blob("encoder"), opts, providers=self.providers)
        self.precision = precision
        self.int8_kernel = None
        if precision == "int8":   # the plan's int8 graph may be marked unable to saturate (7-bit weights)
            self.int8_kernel = plan_int8_kernel_path(plan, mode=int8_kernel_mode)
        denoiser_opts = opts
        if self.int8_kernel is not None:
            (log.warning if self.int8_kernel.slower_than_fp32 else log.info)(
                "msld_sdk: int8 kernels: %s (%s)", self.int8_kernel.name, self.int8_kernel.reason)
            denoiser_opts = session_options(threads, self.int8_kernel.session_config)
        self.denoiser = ort.InferenceSession(plan.blob(plan.denoiser_blob(precision)), denoiser_opts,
                                             providers=self.providers)
        self.decoder = ort.InferenceSession(plan.blob("decoder"), opts, providers=self.providers)
        self.latent_shape, self.cond_shape = plan.latent_shape, plan.condition_shape
        self._local = threading.local()  # per-thread buffers, freed with their thread

    def encode(self, image: np.ndarray) -> np.ndarray:
        """B x C x H x W normalised image -> B x c x h x w image latent."""
        return self.encoder.run(None, {"image": image})[0]

    def buffers(self, batch: int) -> DenoiserBuffers:
        """Bound buffers for this batch size, one set per thread (so threads never share memory).

        Allocated on first use and reused for every later call of the same batch size."""
        cache = getattr(self._local, "buffers", None)
        if cache is None:
            cache = self._local.buffers = {}
        buf = cache.get(batch)
        if buf is None:
            buf = cache[batch] = DenoiserBuffers(batch, self.latent_shape, self.cond_shape).bind(self.denoiser)
        return buf

    def denoise_bound(self, buf: DenoiserBuffers) -> None:
        """One denoiser call on the bound buffers: reads buf.x, buf.t, buf.cond; writes buf.eps."""
        self.denoiser.run_with_iobinding(buf.binding)

    def sample(self, cond: np.ndarray, n_images: int, options: SampleOptions, schedule: Schedule,
               initial_latents: np.ndarray | None = None, cond_per_hypothesis: bool = False,
               progress=None, timings: dict | None = None) -> np.ndarray:
        """The whole sampling loop for ``cond`` (the encoder's output): the final latents
        (n_images * k, C, h, w), laid out [image][hypothesis]. See ``host_loop.host_sample``."""
        return host_sample(self, cond, n_images, options, schedule, initial_latents, cond_per_hypothesis,
                           progress, timings)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """N x c x h x w latents -> N x 1 x H x W foreground probabilities."""
        return self.decoder.run(None, {"z": latents})[0]
