"""The device-resident TensorRT loop (``TensorRTBackend.sample``) and the Segmenter hook that uses it.

On a CPU-only machine (no faking of TensorRT, CUDA or the GPU):
  * the DDIM step table (``Schedule.ddim``) and the per-step timestep tables the device loop uploads
    are exactly those of the CPU loop (``_native.ddim_timesteps``, ``msld_ddim_coeffs_for``, the t
    the CPU loop writes), and the torch GPU loop reads the same table;
  * the step sequence the device loop enqueues (initial noise on Philox stream 0 with hypotheses
    0..k-1 for every image, then per step t, denoiser, DDIM update with the noise of stream
    step + 1), run with the CPU twins of the CUDA kernels, gives ``_native.ddim_sample``'s latents
    bit for bit;
  * ``Segmenter`` samples only through ``backend.sample``, decodes what it returns, and, when
    ``sample`` is the CPU loop, gives exactly the ONNX Runtime path's results.

On a GPU with TensorRT and cuda-python (skipped elsewhere, with the reason): the device loop against
the CPU loop (masks equal except within 1e-4 of the threshold), against the same engine driven from
the host, and CUDA-graph replay against step by step.
"""
from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest

import msld_sdk.backends.host_loop as host_loop_module
from msld_sdk import Segmenter, _native
from msld_sdk.backends import trt_compat
from msld_sdk.backends.host_loop import host_sample
from msld_sdk.backends.onnxruntime_backend import OnnxRuntimeBackend
from msld_sdk.backends.tensorrt_backend import TensorRTBackend, timestep_table
from msld_sdk.image_input import resize_planes
from msld_sdk.plan import Plan
from msld_sdk.sampling import Schedule

# fp32 engines: TensorRT may run fp32 convolutions and matrix products in TF32 (10-bit mantissa,
# its default on Ampere and later GPUs, ~5e-4 relative error a product), against ONNX Runtime
# in full fp32; masks may differ only where a probability is that close to the threshold.
TRT_FP32_ATOL = 2e-3

GPU_REASON = "needs a GPU with TensorRT and cuda-python"


def plan_alphas(path) -> np.ndarray:
    return np.asarray(Plan.open(path).manifest["schedule"]["alphas_cumprod"], np.float32)


def toy_denoiser(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the network (float32 in, float32 out)."""
    tt = (t.astype(np.float32) / np.float32(1000.0))[:, None, None, None]
    return np.tanh(np.float32(0.5) * x + np.float32(0.3) * cond - tt).astype(np.float32)


def ddim_schedule(alphas, steps, spacing):
    return Schedule(alphas, spacing).ddim(steps)


def cpu_loop(alphas, steps, spacing, eta, clip, seed, k, cond, record_t=None, solver="ddim", timesteps=None):
    """``_native.ddim_sample`` (the CPU loop) with ``toy_denoiser``; returns the final latents."""
    n = cond.shape[0]
    x = np.zeros((n * k,) + cond.shape[1:], np.float32)
    eps, t = np.zeros_like(x), np.zeros((n * k,), np.float32)
    cond_k = np.repeat(cond, k, axis=0)

    def denoise():
        if record_t is not None:
            record_t.append(t.copy())
        eps[...] = toy_denoiser(x, t, cond_k)

    _native.ddim_sample(denoise, alphas, steps, spacing, eta, clip, seed, k, n, x, eps, t, solver=solver,
                        timesteps=None if timesteps is None else np.asarray(timesteps, np.int32))
    return x


# ---- schedule and timestep tables ---------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc"])
@pytest.mark.parametrize("steps", [1, 3, 10, 20, 50])
def test_schedule_is_the_cpu_loops(tiny_plan, spacing, steps):
    ac = plan_alphas(tiny_plan)
    T = len(ac)
    steps = min(steps, T)
    s = ddim_schedule(ac, steps, spacing)
    np.testing.assert_array_equal(s.timesteps, _native.ddim_timesteps(T, steps, spacing))
    for i, t in enumerate(s.timesteps.tolist()):
        prev = t - T // steps                       # msld_ddim_coeffs_for
        assert s.alpha_t[i] == float(ac[t])
        assert s.alpha_prev[i] == (float(ac[prev]) if prev >= 0 else 1.0)
    assert [st.noise_stream for st in s.steps()] == list(range(1, steps + 1))   # eta-noise stream: i + 1
    assert [st.prev_timestep for st in s] == [t - T // steps for t in s.timesteps.tolist()]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_schedule_is_the_verified_gpu_loops(tiny_plan, spacing):
    gpu_sampler = pytest.importorskip("msld_export.sampling.gpu_sampler", reason="needs torch (export/)")
    ac = plan_alphas(tiny_plan)
    for steps in (1, 4, 20):
        ref = gpu_sampler.step_table(ac, steps, spacing)
        s = ddim_schedule(ac, steps, spacing)
        assert [(c.timestep, c.alpha_t, c.alpha_prev) for c in ref] == \
               list(zip(s.timesteps.tolist(), s.alpha_t.tolist(), s.alpha_prev.tolist()))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_timestep_table_is_what_the_cpu_loop_writes(tiny_plan, spacing, n_images, rng):
    ac, k, steps = plan_alphas(tiny_plan), 3, 7
    cond = rng.standard_normal((n_images, 2, 4, 4)).astype(np.float32)
    seen = []
    cpu_loop(ac, steps, spacing, 0.0, 0.0, 11, k, cond, record_t=seen)
    table = timestep_table(ddim_schedule(ac, steps, spacing), n_images * k)
    assert table.dtype == np.float32 and table.shape == (steps, n_images * k) and table.flags.c_contiguous
    np.testing.assert_array_equal(np.stack(seen), table)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_device_step_sequence_with_cpu_kernels_is_the_cpu_loop(tiny_plan, rng, eta, clip, spacing, n_images):
    """What the device loop enqueues, with each CUDA kernel replaced by its CPU twin (bit-identical by
    msld_cuda.h, checked on a GPU by test_cuda_kernels.py), equals the CPU loop bit for bit."""
    ac, k, steps, seed = plan_alphas(tiny_plan), 3, 6, 2**63 + 5
    cond = rng.standard_normal((n_images, 2, 4, 4)).astype(np.float32)
    elems = int(np.prod(cond.shape[1:]))
    sched = ddim_schedule(ac, steps, spacing)
    table = timestep_table(sched, n_images * k)
    cond_k = np.repeat(cond, k, axis=0)

    def per_image_noise(stream):  # cuda_gaussian_dev / the in-kernel noise: hypotheses 0..k-1 per image
        return np.concatenate([_native.gaussian(seed, 0, k, elems, stream)] * n_images).reshape(-1)

    x = per_image_noise(0)
    for c in sched.steps():
        eps = toy_denoiser(x.reshape(cond_k.shape), table[c.index], cond_k).reshape(-1)
        noise = per_image_noise(c.noise_stream) if eta > 0 else None
        x, _ = _native.ddim_step(x, eps, c.alpha_t, c.alpha_prev, eta, noise, clip)
    ref = cpu_loop(ac, steps, spacing, eta, clip, seed, k, cond)
    np.testing.assert_array_equal(x.reshape(ref.shape), ref)


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc", "power grid rho 2"])
@pytest.mark.parametrize("steps", [1, 6])
def test_device_dpmpp2m_sequence_with_cpu_kernels_is_the_cpu_loop(tiny_plan, rng, clip, spacing, steps):
    """The DPM-Solver++(2M) sequence the device loop enqueues (t from the table, denoiser, fused update
    with x0_prev kept on the device), with the CPU twin of cuda_dpmpp2m_step, equals the CPU loop;
    also on a timestep grid (``SampleOptions.timesteps``, which the device loop reads from the table)."""
    from msld_sdk.timestep_grids import power_grid
    ac, k, n_images, seed = plan_alphas(tiny_plan), 3, 2, 17
    cond = rng.standard_normal((n_images, 2, 4, 4)).astype(np.float32)
    elems = int(np.prod(cond.shape[1:]))
    grid = power_grid(len(ac), steps, 2.0) if spacing.startswith("power") else None
    spacing = "trailing" if grid is not None else spacing
    sched = Schedule(ac, spacing).table("dpmpp2m", steps, grid)
    table = timestep_table(sched, n_images * k)
    cond_k = np.repeat(cond, k, axis=0)
    x = np.concatenate([_native.gaussian(seed, 0, k, elems, 0)] * n_images).reshape(-1)
    x0_prev = np.full_like(x, np.nan)   # the device buffer starts uninitialised: unread at order 1
    for c in sched:
        eps = toy_denoiser(x.reshape(cond_k.shape), table[c.index], cond_k).reshape(-1)
        x, x0_prev = _native.dpmpp2m_step(x, eps, x0_prev, c.order, c.alpha_t, c.x_coef, c.x0_coef,
                                          c.x0_prev_coef, clip)
    ref = cpu_loop(ac, steps, spacing, 0.0, clip, seed, k, cond, solver="dpmpp2m", timesteps=grid)
    np.testing.assert_array_equal(x.reshape(ref.shape), ref)


# ---- the Segmenter hook ---------------------------------------------------------------------------------

class CpuLoopBackend:
    """A backend whose ``sample`` runs the CPU loop on a wrapped ONNX Runtime backend, as a device loop
    would: it reports no denoise time. It has no ``buffers`` / ``denoise_bound``, so the Segmenter can
    only get latents through ``sample``."""

    name = "cpu-run-loop"

    def __init__(self, inner: OnnxRuntimeBackend):
        self.inner, self.calls, self.decoded, self.returned = inner, [], [], []

    def encode(self, image):
        return self.inner.encode(image)

    def decode(self, latents):
        self.decoded.append(latents)
        return self.inner.decode(latents)

    def sample(self, cond, n_images, options, schedule, initial_latents=None, cond_per_hypothesis=False,
               progress=None, timings=None):
        self.calls.append(dict(cond=cond.copy(), k=options.k, n_images=n_images, steps=options.steps,
                               spacing=schedule.spacing, eta=options.eta, clip=schedule.clip, seed=options.seed,
                               alphas=np.array(schedule.alphas_cumprod), initial=initial_latents,
                               per_hypothesis=cond_per_hypothesis))
        k = options.k
        buf = self.inner.buffers(n_images * k)
        buf.cond[...] = cond if cond_per_hypothesis else np.repeat(cond, k, axis=0)
        if initial_latents is not None:
            buf.x[...] = initial_latents
        _native.ddim_sample(lambda: self.inner.denoise_bound(buf), schedule.alphas_cumprod, options.steps,
                            schedule.spacing, options.eta, schedule.clip, options.seed, k, n_images, buf.x, buf.eps,
                            buf.t, latents_given=initial_latents is not None)
        out = buf.x.copy()
        self.returned.append(out)
        return out


class CountingNative:
    """``_native`` with its ddim_sample calls counted (everything else passes through)."""

    def __init__(self):
        self.ddim_sample_calls = 0

    def __getattr__(self, name):
        return getattr(_native, name)

    def ddim_sample(self, *a, **kw):
        self.ddim_sample_calls += 1
        return _native.ddim_sample(*a, **kw)


def test_initial_latents_reach_sample_and_equal_the_cpu_path(tiny_plan, rng):
    imgs = [rng.random((40, 50), dtype=np.float32) for _ in range(2)]
    plain = Segmenter(tiny_plan, backend="onnxruntime")
    lat = plain.plan.latent_shape
    x0 = rng.standard_normal((6, *lat)).astype(np.float32)
    ref = plain.run(imgs, k=3, steps=4, initial_latents=x0)
    hooked = Segmenter(tiny_plan, backend="onnxruntime")
    fake = hooked.backend = CpuLoopBackend(hooked.backend)
    got = hooked.run(imgs, k=3, steps=4, initial_latents=[x0[:3], x0[3:]])
    np.testing.assert_array_equal(fake.calls[0]["initial"], x0)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.probs, b.probs)


def test_both_backends_have_one_sampling_entry():
    for cls in (OnnxRuntimeBackend, TensorRTBackend):
        assert not hasattr(cls, "run_loop") and not hasattr(cls, "_host_loop")
        params = list(inspect.signature(cls.sample).parameters)
        assert params == ["self", "cond", "n_images", "options", "schedule", "initial_latents",
                          "cond_per_hypothesis", "progress", "timings"]


def test_sample_gets_one_cond_row_per_hypothesis_with_views(tiny_rgb_plan, rng):
    """With test-time views the loop gets cond per hypothesis (n*k rows) and gives the CPU path's result."""
    imgs = [rng.random((40, 50, 3), dtype=np.float32) for _ in range(2)]
    ref = Segmenter(tiny_rgb_plan, backend="onnxruntime").run(imgs, k=3, steps=4, seed=2, views=4)
    hooked = Segmenter(tiny_rgb_plan, backend="onnxruntime")
    fake = hooked.backend = CpuLoopBackend(hooked.backend)
    got = hooked.run(imgs, k=3, steps=4, seed=2, views=4)
    c = fake.calls[0]
    assert c["per_hypothesis"] and c["cond"].shape[0] == 2 * 3
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a.probs, b.probs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n_images", [1, 2])
def test_segmenter_routes_through_sample_and_equals_the_cpu_path(tiny_plan, rng, monkeypatch, eta, n_images):
    counting = CountingNative()
    monkeypatch.setattr(host_loop_module, "_native", counting)
    imgs = [rng.random((40, 50), dtype=np.float32) for _ in range(n_images)]
    plain = Segmenter(tiny_plan, backend="onnxruntime")
    ref = plain.run(imgs, k=3, steps=5, seed=9, eta=eta)
    assert counting.ddim_sample_calls == 1                  # ONNX Runtime's sample: the native CPU loop

    hooked = Segmenter(tiny_plan, backend="onnxruntime")
    fake = hooked.backend = CpuLoopBackend(hooked.backend)
    got = hooked.run(imgs, k=3, steps=5, seed=9, eta=eta)
    assert counting.ddim_sample_calls == 1                  # the Segmenter did not run its own loop
    assert len(fake.calls) == 1
    c = fake.calls[0]
    assert (c["k"], c["n_images"], c["steps"], c["spacing"], c["eta"], c["clip"], c["seed"]) == \
           (3, n_images, 5, plain.schedule.spacing, eta, plain.schedule.clip, 9)
    np.testing.assert_array_equal(c["alphas"], plain.schedule.alphas_cumprod)
    assert c["cond"].shape[0] == n_images
    assert len(fake.decoded) == 1 and fake.decoded[0] is fake.returned[0]   # what sample returned is decoded
    for a, b in zip(got, ref):
        for field in ("masks", "probs", "mean", "confidence", "consensus"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.seed == b.seed == 9
        assert set(a.timings) == set(b.timings)
        assert a.timings["loop_overhead_ms"] == 0.0 and a.timings["denoise_ms"] > 0.0


def test_segmenter_decodes_exactly_the_latents_sample_returns(tiny_plan, rng):
    seg = Segmenter(tiny_plan, backend="onnxruntime")
    inner = seg.backend
    k, img = 4, rng.random((30, 20), dtype=np.float32)
    known = rng.standard_normal((k,) + inner.latent_shape).astype(np.float32)

    class KnownLatents(CpuLoopBackend):
        def sample(self, cond, n_images, options, schedule, **kw):
            self.calls.append(options.k)
            return known

    seg.backend = KnownLatents(inner)
    r = seg.run(img, k=k, steps=3, seed=1)
    assert seg.backend.decoded[0] is known
    probs = resize_planes(np.ascontiguousarray(inner.decode(known)[:, 0]), img.shape)
    np.clip(probs, 0.0, 1.0, out=probs)
    np.testing.assert_array_equal(r.probs, probs)
    masks, mean, conf, cons = _native.aggregate(probs, 0.5)
    np.testing.assert_array_equal(r.masks, masks)
    np.testing.assert_array_equal(r.mean, mean)


# ---- on a GPU -------------------------------------------------------------------------------------------

def _gpu_skip_reason() -> str | None:
    ccs, why = trt_compat.gpu_compute_capabilities()
    if not ccs:
        return f"{GPU_REASON} ({why})"
    if not trt_compat.installed_flavours():
        return f"{GPU_REASON} (no TensorRT module: {trt_compat.install_hint()})"
    if not trt_compat.cuda_python_installed():
        return f"{GPU_REASON} (cuda-python is not installed)"
    if not getattr(_native, "built_with_cuda", False):
        return f"{GPU_REASON}, and msld_sdk._native built with the CUDA kernels (it was built without nvcc)"
    return None


@pytest.fixture(scope="module")
def gpu_plan(tiny_plan, tmp_path_factory):
    why = _gpu_skip_reason()
    if why:
        pytest.skip(why)
    from msld_sdk.tools.engine_build import build_engines  # pragma: no cover - GPU only from here
    fl = trt_compat.load()
    cc = trt_compat.gpu_compute_capabilities()[0][0]
    if fl.supported_targets() is not None and cc not in fl.supported_targets():
        pytest.skip(f"{GPU_REASON}: {fl.display} cannot target this GPU (compute capability {cc})")
    path = tmp_path_factory.mktemp("trt") / "loop.plan"
    shutil.copy(tiny_plan, path)
    build_engines(path, fp32=True, compute_capabilities=[cc], progress=False, echo=lambda s: None)
    return path


def _near(probs, thr=0.5, tol=TRT_FP32_ATOL):
    return np.abs(probs - thr) < tol


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_gpu_sample_masks_equal_the_cpu_loop(gpu_plan, eta):  # pragma: no cover - GPU only
    rng = np.random.default_rng(3)
    imgs = [rng.random((40, 50), dtype=np.float32) for _ in range(2)]
    trt_seg = Segmenter(gpu_plan, backend="tensorrt")
    ort_seg = Segmenter(gpu_plan, backend="onnxruntime")
    for _ in range(2):  # first call step by step (then captured), second replayed where capture works
        got = trt_seg.run(imgs, k=3, steps=6, seed=21, eta=eta)
        assert trt_seg.backend.last_loop_mode in ("steps", "graph")
        ref = ort_seg.run(imgs, k=3, steps=6, seed=21, eta=eta)
        for a, b in zip(got, ref):
            assert not ((a.masks != b.masks) & ~_near(b.probs)).any()
            np.testing.assert_allclose(a.probs, b.probs, atol=TRT_FP32_ATOL)


def test_gpu_dpmpp2m_sample_masks_equal_the_cpu_loop(gpu_plan):  # pragma: no cover - GPU only
    rng = np.random.default_rng(5)
    imgs = [rng.random((40, 50), dtype=np.float32) for _ in range(2)]
    trt_seg = Segmenter(gpu_plan, backend="tensorrt")
    ort_seg = Segmenter(gpu_plan, backend="onnxruntime")
    for _ in range(2):  # step by step, then replayed where capture works
        got = trt_seg.run(imgs, k=3, steps=5, seed=21, solver="dpmpp2m")
        assert trt_seg.backend.last_loop_mode in ("steps", "graph")
        ref = ort_seg.run(imgs, k=3, steps=5, seed=21, solver="dpmpp2m")
        from msld_sdk.timestep_grids import power_grid
        grid = power_grid(trt_seg.schedule.num_train_timesteps, 5, 2.0)
        got += trt_seg.run(imgs, k=3, seed=21, solver="dpmpp2m", timesteps=grid)
        ref += ort_seg.run(imgs, k=3, seed=21, solver="dpmpp2m", timesteps=grid)
        for a, b in zip(got, ref):
            assert a.solver == b.solver == "dpmpp2m"
            assert not ((a.masks != b.masks) & ~_near(b.probs)).any()
            np.testing.assert_allclose(a.probs, b.probs, atol=TRT_FP32_ATOL)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_gpu_sample_equals_the_host_driven_loop_on_the_same_engine(gpu_plan, eta):  # pragma: no cover
    seg = Segmenter(gpu_plan, backend="tensorrt")
    b = seg.backend
    b.use_cuda_graph = False
    cond = b.encode(np.random.default_rng(4).random((2, Plan.open(gpu_plan).channels,
                                                     *Plan.open(gpu_plan).image_size)).astype(np.float32))
    args = (2, seg.options(k=3, steps=6, eta=eta, seed=77), seg.schedule)
    dev = b.sample(cond, *args)
    assert b.last_loop_mode == "steps"
    host = host_sample(b, cond, *args)
    np.testing.assert_allclose(dev, host, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_gpu_graph_replay_equals_step_by_step(gpu_plan, eta, caplog):  # pragma: no cover - GPU only
    seg = Segmenter(gpu_plan, backend="tensorrt")
    b = seg.backend
    pl = Plan.open(gpu_plan)
    cond = b.encode(np.random.default_rng(5).random((2, pl.channels, *pl.image_size)).astype(np.float32))

    def run(seed):
        return b.sample(cond, 2, seg.options(k=4, steps=8, eta=eta, seed=seed), seg.schedule)

    first = run(1)                      # step by step, then capture
    assert b.last_loop_mode == "steps"
    replay = run(1)
    if b.last_loop_mode != "graph":
        fails = [r.getMessage() for r in caplog.records if "CUDA graph capture" in r.getMessage()]
        pytest.skip(f"CUDA graph capture did not succeed here: {fails}")
    np.testing.assert_allclose(replay, first, rtol=0, atol=1e-6)
    other = run(2**64 - 3)              # a new seed through the device word, same graph
    assert b.last_loop_mode == "graph"
    b.use_cuda_graph = False
    other_steps = run(2**64 - 3)
    assert b.last_loop_mode == "steps"
    np.testing.assert_allclose(other, other_steps, rtol=0, atol=1e-6)
    assert not np.allclose(other, first)


# ---- the device loop's own code on the CPU (tests/trt_fake.py) --------------------------------------
def test_device_loop_code_equals_the_host_and_native_loops_on_fake_cuda(monkeypatch):
    """TensorRTBackend.sample's device path (step by step, then captured and replayed) with host
    memory for device memory, a toy engine and the native CPU functions for the CUDA kernels:
    bit for bit the CPU-driven loop (host_sample) and the native loop, over solvers, eta, clip,
    images, k, engine batch maxima that split a batch, a cond row per hypothesis, given initial
    latents and the t dtype. Real TensorRT and CUDA are the GPU tests' business."""
    import itertools
    from collections import Counter

    import trt_fake
    from msld_sdk.backends import tensorrt_backend as tb
    from msld_sdk.sampling import SampleOptions, Schedule
    monkeypatch.setattr(tb, "_native", trt_fake.fake_native)
    rng = np.random.default_rng(0)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 100)).astype(np.float32)
    modes = Counter()
    for solver, eta, clip, n, k, maxb, per_h, init, tdt in itertools.product(
            ["ddim", "dpmpp2m"], [0.0, 1.0], [0.0, 1.0], [1, 3], [1, 3], [32, 4], [False, True], [False, True],
            [np.float32, np.int64]):
        if solver == "dpmpp2m" and eta:
            continue
        sched = Schedule(ac, "trailing", clip=clip)
        opts = SampleOptions(k=k, steps=5, seed=2**63 + 11, eta=eta, solver=solver)
        b = trt_fake.make_backend(max_batch=maxb, t_dtype=tdt)
        cond = rng.standard_normal((n * k if per_h else n, 2, 4, 4)).astype(np.float32)
        x0 = rng.standard_normal((n * k, 2, 4, 4)).astype(np.float32) if init else None
        ref = host_sample(b, cond, n, opts, sched, x0, per_h)
        for _ in range(3):   # first call step by step, then graph replays
            got = b.sample(cond, n, opts, sched, x0, per_h)
            modes[b.last_loop_mode] += 1
            np.testing.assert_array_equal(got, ref)
        if not per_h:
            x = np.zeros((n * k, 2, 4, 4), np.float32) if x0 is None else x0.copy()
            eps, t, ck = np.zeros_like(x), np.zeros(n * k, np.float32), np.repeat(cond, k, 0)

            def den():
                eps[...] = trt_fake.toy_denoiser(x, t.astype(tdt), ck)
            _native.ddim_sample(den, ac, 5, "trailing", eta, clip, opts.seed, k, n, x, eps, t, solver=solver,
                                latents_given=init)
            np.testing.assert_array_equal(x, ref)
    assert modes["graph"] > 0 and modes["steps"] > 0 and set(modes) <= {"graph", "steps"}


def test_device_loop_refuses_initial_latents_of_the_wrong_shape(monkeypatch):
    """Too few rows left the last rows of x from the previous call; another latent shape copied
    past the device buffer. Both refused, as the CPU-driven loop refuses them."""
    import trt_fake
    from msld_sdk.backends import tensorrt_backend as tb
    from msld_sdk.sampling import SampleOptions, Schedule
    monkeypatch.setattr(tb, "_native", trt_fake.fake_native)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 100)).astype(np.float32)
    b = trt_fake.make_backend()
    cond, opts = np.ones((2, 2, 4, 4), np.float32), SampleOptions(k=3, steps=4, seed=5)
    for bad in (np.zeros((5, 2, 4, 4), np.float32), np.zeros((6, 2, 8, 8), np.float32)):
        with pytest.raises(ValueError, match=r"initial_latents has shape .*, expected \(6, 2, 4, 4\)"):
            b.sample(cond, 2, opts, Schedule(ac, "trailing"), bad)
