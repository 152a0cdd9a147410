"""The CPU-driven sampling loop, shared by every backend that can run one denoiser call at a time.

``host_sample`` fills a backend's host buffers (``DenoiserBuffers``) and runs the native loop
(``_native.ddim_sample``, DDIM or DPM-Solver++(2M) as ``options.solver`` says), which calls ``backend.denoise_bound(buf)`` once per step. The ONNX
Runtime backend samples only this way; the TensorRT backend falls back to it when its device
loop cannot run.
"""
from __future__ import annotations

import time

import numpy as np

from .. import _native
from ..sampling import SOLVERS, SampleOptions, Schedule


class DenoiserBuffers:
    """Host memory of one denoiser batch size: x, eps (latent shape), t (timesteps), cond.

    ``bind(session)`` binds them to an ONNX Runtime session's I/O binding (``binding``), so that
    the runtime reads and writes these arrays in place."""

    def __init__(self, batch: int, latent_shape: tuple[int, int, int],
                 cond_shape: tuple[int, int, int] | None = None):
        self.x = np.zeros((batch, *latent_shape), np.float32)
        self.eps = np.zeros((batch, *latent_shape), np.float32)
        self.t = np.zeros((batch,), np.float32)
        self.cond = np.zeros((batch, *(cond_shape or latent_shape)), np.float32)
        self.binding = None

    def bind(self, session) -> "DenoiserBuffers":
        import onnxruntime as ort
        self.binding = session.io_binding()
        for name, arr in (("x", self.x), ("t", self.t), ("cond", self.cond)):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        self.binding.bind_ortvalue_output("eps", ort.OrtValue.ortvalue_from_numpy(self.eps))
        return self


def check_sample_args(cond: np.ndarray, n_images: int, options: SampleOptions, cond_per_hypothesis: bool,
                      initial_latents=None, latent_shape=None) -> None:
    """The checks every backend's ``sample`` makes on its arguments (``initial_latents`` against
    (n_images * k, *latent_shape) when both are given)."""
    rows = n_images * options.k if cond_per_hypothesis else n_images
    if cond.shape[0] != rows:
        raise ValueError(f"cond holds {cond.shape[0]} rows, expected {rows} "
                         f"({'one per hypothesis' if cond_per_hypothesis else 'one per image'})")
    if initial_latents is not None and latent_shape is not None:
        want = (n_images * options.k, *tuple(latent_shape))
        if tuple(np.shape(initial_latents)) != want:
            raise ValueError(f"initial_latents has shape {tuple(np.shape(initial_latents))}, expected {want}")
    if options.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {options.solver!r}")
    if options.solver != "ddim" and options.eta != 0.0:
        raise ValueError(f"solver {options.solver!r} runs with eta 0 only, got eta={options.eta}")


def host_sample(backend, cond: np.ndarray, n_images: int, options: SampleOptions, schedule: Schedule,
                initial_latents: np.ndarray | None = None, cond_per_hypothesis: bool = False,
                progress=None, timings: dict | None = None) -> np.ndarray:
    """The native CPU-driven loop on ``backend.buffers(n_images * k)``; returns a copy of the
    final latents (n_images * k, C, h, w). ``cond``: one row per image (repeated k times here)
    or, with ``cond_per_hypothesis``, one per hypothesis. ``progress(done, total)`` after each
    step. ``timings``, if given, gets ``denoise_s``: the time spent inside denoiser calls."""
    check_sample_args(cond, n_images, options, cond_per_hypothesis)
    k = options.k
    buf = backend.buffers(n_images * k)
    buf.cond[...] = cond if cond_per_hypothesis else np.repeat(cond, k, axis=0)
    if initial_latents is not None:
        buf.x[...] = np.asarray(initial_latents, np.float32).reshape(buf.x.shape)
    spent = [0.0]

    def denoise():
        s = time.perf_counter()
        backend.denoise_bound(buf)
        spent[0] += time.perf_counter() - s

    def step_done(done, total):
        progress(done, total)

    _native.ddim_sample(denoise, schedule.alphas_cumprod, options.steps, schedule.spacing, options.eta,
                        schedule.clip, options.seed, k, n_images, buf.x, buf.eps, buf.t,
                        step_done if progress is not None else None, latents_given=initial_latents is not None,
                        solver=options.solver,
                        timesteps=None if options.timesteps is None else np.asarray(options.timesteps, np.int32))
    if timings is not None:
        timings["denoise_s"] = timings.get("denoise_s", 0.0) + spent[0]
    return buf.x.copy()
