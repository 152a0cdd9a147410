"""The device-resident loop for k hypotheses (export/msld_export/sampling/batched_sampler.py) and the paper-scale GPU
benchmark (benchmarks/gpu_paper_scale.py), issue #13.

On the CPU: the loop's DDIM update, aggregation and whole run equal the native code bit for bit on the
same seed (fp32); it equals the SDK's own run (Segmenter, ONNX Runtime) on a reference-architecture
plan; bf16 keeps the latents, noise and probabilities in fp32 and the agreement figure is what it
says; the benchmark runs end to end with ``--device cpu`` (and without diffusers or TensorRT, as on
the lent GPU machine). GPU tests skip without CUDA. Models are the reference architecture narrowed to
base 32 channels (``bench_plan``'s configuration), so every test takes seconds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from msld_sdk import _native  # noqa: E402
from msld_sdk.tools.bench import mask_agreement  # noqa: E402

from conftest import NARROW_BENCH, ROOT  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref_model():
    from msld_export.reference.bench_plan import RandomReferenceModel
    return RandomReferenceModel(NARROW_BENCH["family"], NARROW_BENCH["seed"], NARROW_BENCH["base_channels"])


def _image(n=1, seed=0, size=128, ch=1):
    return torch.rand(n, ch, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _native_run(m, image, k, steps, seed, eta=0.0, solver="ddim", timesteps=None):
    """The SDK's native loop (msld_ddim_sample) with the same torch modules as its denoiser, then the
    decoder and msld_aggregate: what the batched loop must reproduce."""
    from msld_export.reference.model import DecoderGraph
    n = image.shape[0]
    with torch.no_grad():
        cond = m.embedder(image)
        cond_k = cond.unsqueeze(1).expand(n, k, *cond.shape[1:]).reshape(n * k, *cond.shape[1:]).contiguous()
    x = np.zeros((n * k, m.opts["latent"][0], *cond.shape[2:]), np.float32)
    eps, t = np.zeros_like(x), np.zeros(n * k, np.float32)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)

    def denoise():
        with torch.no_grad():
            eps[...] = m.denoiser(xt, tt, cond_k).numpy()

    _native.ddim_sample(denoise, m.alphas, steps, "linspace_trunc", eta, 1.0, seed, k, n, x, eps, t, solver=solver,
                        timesteps=None if timesteps is None else np.asarray(timesteps, np.int32))
    with torch.no_grad():
        probs = DecoderGraph(m.decoder, m.opts["latent_scaling_factor"])(torch.from_numpy(x)).numpy()
    probs = probs.reshape(n, k, *probs.shape[-2:])
    return x.reshape(n, k, *x.shape[1:]), probs, [_native.aggregate(np.ascontiguousarray(p), 0.5) for p in probs]


# ---- pieces, bit for bit ---------------------------------------------------------------------------

@pytest.mark.parametrize("eta,clip", [(0.0, 0.0), (0.0, 1.0), (0.7, 1.0)])
def test_ddim_update_equals_the_native_kernel(eta, clip):
    from msld_export.sampling.batched_sampler import ddim_scalars, ddim_update
    from msld_sdk.sampling import Schedule
    from msld_export.reference.bench_plan import linear_alphas_bar
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4099, dtype=np.float32) * 3
    e = rng.standard_normal(4099, dtype=np.float32)
    z = rng.standard_normal(4099, dtype=np.float32)
    for c in Schedule(linear_alphas_bar(1000, 1e-4, 2e-2), "linspace_trunc").ddim(20):
        want, _ = _native.ddim_step(x, e, c.alpha_t, c.alpha_prev, eta, z if eta > 0 else None, clip)
        s = torch.from_numpy(ddim_scalars(c, eta, clip))
        got = ddim_update(torch.from_numpy(x), torch.from_numpy(e), s, clip, torch.from_numpy(z) if eta > 0 else None)
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc"])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_dpm2m_update_equals_the_native_kernel(spacing, clip):
    from msld_export.sampling.batched_sampler import dpm2m_scalars, dpm2m_update
    from msld_sdk.sampling import Schedule
    from msld_export.reference.bench_plan import linear_alphas_bar
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4099, dtype=np.float32) * 3
    e = rng.standard_normal(4099, dtype=np.float32)
    xn, x0n, xt, x0t = x, None, torch.from_numpy(x), None
    for c in Schedule(linear_alphas_bar(1000, 1e-4, 2e-2), spacing).dpmpp2m(8):
        xn, x0n = _native.dpmpp2m_step(xn, e, x0n, c.order, c.alpha_t, c.x_coef, c.x0_coef, c.x0_prev_coef, clip)
        s = torch.from_numpy(dpm2m_scalars(c, clip))
        xt, x0t = dpm2m_update(xt, torch.from_numpy(e), s, clip, c.order, x0t)
        np.testing.assert_array_equal(xt.numpy(), xn)
        np.testing.assert_array_equal(x0t.numpy(), x0n)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_aggregate_equals_msld_aggregate(k):
    from msld_export.sampling.batched_sampler import aggregate
    rng = np.random.default_rng(k)
    p = rng.random((k, 37, 41), dtype=np.float32)
    p[:, :3] = 0.5                                   # exactly at the threshold: not foreground
    got = aggregate(torch.from_numpy(p), 0.5)
    want = _native.aggregate(p, 0.5)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)


# ---- the whole loop on the CPU ---------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_cpu_loop_equals_the_native_loop_bit_for_bit(ref_model, eta):
    from msld_export.sampling.batched_sampler import BatchedSampler
    s = BatchedSampler.from_reference(ref_model, device="cpu", eta=eta)
    assert (s.spacing, s.clip, s.noise) == ("linspace_trunc", 1.0, "host")
    img, seed = _image(2), 2 ** 63 + 12345
    r = s.sample(img, k=3, steps=3, seed=seed)
    lat, probs, agg = _native_run(ref_model, img, 3, 3, seed, eta)
    np.testing.assert_array_equal(r.latents.numpy(), lat)
    np.testing.assert_array_equal(r.probs.numpy(), probs)
    for b, (masks, mean, conf, cons) in enumerate(agg):
        np.testing.assert_array_equal(r.masks[b].numpy(), masks)
        np.testing.assert_array_equal(r.mean[b].numpy(), mean)
        np.testing.assert_array_equal(r.confidence[b].numpy(), conf)
        np.testing.assert_array_equal(r.consensus[b].numpy(), cons)


@pytest.mark.parametrize("steps", [1, 4])
def test_cpu_dpmpp2m_loop_equals_the_native_loop_bit_for_bit(ref_model, steps):
    from msld_export.sampling.batched_sampler import BatchedSampler
    s = BatchedSampler.from_reference(ref_model, device="cpu", solver="dpmpp2m")
    img, seed = _image(2), 2 ** 63 + 12345
    r = s.sample(img, k=3, steps=steps, seed=seed)
    lat, probs, agg = _native_run(ref_model, img, 3, steps, seed, solver="dpmpp2m")
    np.testing.assert_array_equal(r.latents.numpy(), lat)
    np.testing.assert_array_equal(r.probs.numpy(), probs)
    for b, (masks, mean, conf, cons) in enumerate(agg):
        np.testing.assert_array_equal(r.masks[b].numpy(), masks)
        np.testing.assert_array_equal(r.mean[b].numpy(), mean)
    with pytest.raises(ValueError, match="eta 0 only"):
        BatchedSampler.from_reference(ref_model, device="cpu", solver="dpmpp2m", eta=0.5)


def test_cpu_dpmpp2m_loop_on_a_timestep_grid_equals_the_native_loop(ref_model):
    from msld_export.sampling.batched_sampler import BatchedSampler
    from msld_sdk.timestep_grids import power_grid
    grid = power_grid(len(ref_model.alphas), 4, 2.0)
    s = BatchedSampler.from_reference(ref_model, device="cpu", solver="dpmpp2m", timesteps=grid)
    img = _image(2)
    r = s.sample(img, k=3, steps=4, seed=5)
    lat, probs, _ = _native_run(ref_model, img, 3, 4, 5, solver="dpmpp2m", timesteps=grid)
    np.testing.assert_array_equal(r.latents.numpy(), lat)
    np.testing.assert_array_equal(r.probs.numpy(), probs)
    rule, _, _ = _native_run(ref_model, img, 3, 4, 5, solver="dpmpp2m")
    assert not np.array_equal(rule, lat)                    # the grid is not the spacing rule's
    with pytest.raises(ValueError, match="timestep grid has 4"):
        s.sample(img, k=3, steps=5, seed=5)
    with pytest.raises(ValueError, match="for solver 'dpmpp2m'"):
        BatchedSampler.from_reference(ref_model, device="cpu", timesteps=grid)


def test_cpu_loop_equals_the_sdk_on_a_reference_plan(ref_model, lidc_bench_plan):
    """Segmenter (ONNX Runtime, native loop) on the plan bench_plan wrote for the same configuration
    and seed, against the batched loop on the torch modules: the same run up to float rounding."""
    from msld_export.sampling.batched_sampler import BatchedSampler
    from msld_sdk import Segmenter
    from msld_sdk.plan import Plan
    inp = Plan.open(lidc_bench_plan).manifest["input"]
    img01 = np.random.default_rng(5).random((128, 128), dtype=np.float32)
    sdk = Segmenter(lidc_bench_plan, threads=1).run(img01, k=2, steps=3, seed=11)
    image = torch.from_numpy((img01 - inp["mean"][0]) / inp["std"][0])[None, None]
    r = BatchedSampler.from_reference(ref_model, device="cpu").sample(image, k=2, steps=3, seed=11)
    # float32 on both sides, same noise: measured 3e-5 on the probabilities; masks may differ only
    # where a probability sits within that rounding of the threshold
    probs = r.probs[0].numpy()
    np.testing.assert_allclose(sdk.probs, probs, atol=1e-4)
    np.testing.assert_allclose(sdk.mean, r.mean[0].numpy(), atol=1e-4)
    differ = r.masks[0].numpy() != sdk.masks
    assert not (differ & (np.abs(probs - 0.5) >= 1e-4)).any()


def test_per_hypothesis_eager_computes_the_batched_result(ref_model):
    """(a), the reference's own way, starts hypothesis i from the SDK's noise for (seed, i)."""
    from msld_export.sampling.batched_sampler import BatchedSampler, per_hypothesis_eager
    s = BatchedSampler.from_reference(ref_model, device="cpu")
    img = _image()
    r = s.sample(img, k=2, steps=3, seed=4)
    p = per_hypothesis_eager(s.encoder, s.denoiser, s.decoder, s.alphas, img, k=2, steps=3, seed=4)
    assert p.shape == r.probs[0].shape and p.dtype == torch.float32
    assert float((p - r.probs[0]).abs().max()) < 1e-4   # measured 1e-5: float32 rounding of one computation


def _fast_bf16_on_this_cpu() -> bool:
    """oneDNN runs bf16 convolutions with AVX-512 (natively with avx512_bf16/AMX, else emulated in
    AVX-512); on an AVX2-only CPU it falls back to reference kernels that take minutes here."""
    from msld_sdk.tools.cpu_features import cpu_info
    return bool((cpu_info()["isa"] or {}).get("avx512f"))


@pytest.mark.skipif(not _fast_bf16_on_this_cpu(),
                    reason="bf16 without AVX-512 runs oneDNN's reference kernels (minutes per run); "
                           "the GPU lease and AVX-512 machines run it")
def test_bf16_keeps_the_sampler_state_in_fp32_and_agreement_is_computed(ref_model):
    from msld_export.sampling.batched_sampler import BatchedSampler
    f32 = BatchedSampler.from_reference(ref_model, device="cpu")
    b16 = BatchedSampler.from_reference(ref_model, device="cpu", dtype="bf16")
    assert {p.dtype for p in b16.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ref_model.denoiser.parameters()} == {torch.float32}   # the caller's: copied
    # the same noise: the SDK's Philox normals, whatever the networks' dtype
    for s in (f32, b16):
        buf = torch.empty(1, 3, 1, 32, 32)
        s._draw(buf, 9, None, 3, 1)
        np.testing.assert_array_equal(buf.reshape(3, -1).numpy(), _native.gaussian(9, 0, 3, 32 * 32, 0))
    img = _image(seed=3)
    a, b = f32.sample(img, k=3, steps=3, seed=9), b16.sample(img, k=3, steps=3, seed=9)
    assert b.latents.dtype == b.probs.dtype == b.mean.dtype == torch.float32
    assert not torch.equal(a.probs, b.probs)                      # bf16 did run
    ag = mask_agreement(a.consensus[0].numpy(), b.consensus[0].numpy(), a.masks[0].numpy(), b.masks[0].numpy())
    ca, cb = a.consensus[0].numpy(), b.consensus[0].numpy()
    assert ag["consensus_pixel_agreement"] == np.count_nonzero(ca == cb) / ca.size
    assert ag["masks_pixel_agreement"] == np.count_nonzero(a.masks[0].numpy() == b.masks[0].numpy()) / a.masks[0].numel()
    assert ag["consensus_iou"] == np.count_nonzero(ca & cb) / max(1, np.count_nonzero(ca | cb))
    assert 0.5 < ag["consensus_pixel_agreement"] <= 1.0


def test_channels_last_and_errors_on_the_cpu(ref_model):
    from msld_export.sampling.batched_sampler import BatchedSampler
    img = _image(seed=1)
    a = BatchedSampler.from_reference(ref_model, device="cpu").sample(img, k=2, steps=2, seed=1)
    cl = BatchedSampler.from_reference(ref_model, device="cpu", channels_last=True)
    assert cl.denoiser.conv_out[-1].weight.is_contiguous(memory_format=torch.channels_last)
    b = cl.sample(img, k=2, steps=2, seed=1)
    assert float((a.probs - b.probs).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="CUDA"):
        cl.sample(img, k=2, steps=2, use_graph=True)
    with pytest.raises(ValueError, match="k must be"):
        cl.sample(img, k=0, steps=2)
    with pytest.raises(ValueError, match="dtype"):
        BatchedSampler.from_reference(ref_model, device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="native-cuda"):
        BatchedSampler.from_reference(ref_model, device="cpu", noise="native-cuda")


# ---- the benchmark ---------------------------------------------------------------------------------

def test_flop_count_equals_the_onnx_graphs(ref_model, lidc_bench_plan):
    from benchmarks.gpu_paper_scale import denoiser_flops
    from msld_sdk.tools.flops import graph_flops
    from msld_sdk.plan import Plan
    o = ref_model.opts
    per_hyp = denoiser_flops(ref_model.denoiser, o["latent"][0], o["embedder"]["z_channels"], o["latent"][1:], "cpu")
    assert 2 * per_hyp == graph_flops(Plan.open(lidc_bench_plan).blob("denoiser"), 2)


# The lent GPU machine has no diffusers and no TensorRT: the benchmark must not import them.
_NO_DIFFUSERS = ("import runpy, sys; sys.modules['diffusers'] = None; sys.modules['tensorrt'] = None; "
                 "sys.modules['tensorrt_rtx'] = None; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("half", [
    None,
    pytest.param("bf16", marks=pytest.mark.skipif(not _fast_bf16_on_this_cpu(),
                                                  reason="bf16 without AVX-512 runs oneDNN's reference kernels "
                                                         "(minutes per run); the fp32 run is checked here")),
])
def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path, half):
    out = tmp_path / "smoke.json"
    dtypes = ["fp32"] + ([half] if half else [])
    cmd = [sys.executable, "-c", _NO_DIFFUSERS, str(ROOT / "benchmarks" / "gpu_paper_scale.py"),
           "--family", "lidc", "--device", "cpu", "--base-channels", "32", "32", "32", "--k", "2", "--steps", "2",
           "--mem-ks", "1", "2", "--dtypes", *dtypes, "--channels-last", "off", "--repeats", "1",
           "--warmup", "0", "--baseline-repeats", "1", "--agreement-seeds", "1", "--denoiser-repeats", "1",
           "--threads", "1", "--budget-s", "3600", "--out", str(out)]
    # the budget and the timeout only guard against a hang; speed is the benchmark's business
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["partial"] is False and not d["errors"] and not d["skipped"]
    assert set(d["configs"]) == {"a_per_hypothesis_fp32", "eager_fp32"} | ({f"eager_{half}"} if half else set())
    assert d["configs"]["eager_fp32"]["vs_a"]["max_abs_prob_diff"] < 1e-4   # float32 rounding, as above
    if half:
        ag = d["agreement"][f"eager_{half}"]
        assert ag["vs"] == "fp32_strict_reference" and 0.0 <= ag["consensus_pixel_agreement"] <= 1.0
        assert d["summary"]["rows"][f"eager_{half}"]["speedup_over_a"] > 0
    assert d["agreement"]["eager_fp32"]["consensus_pixel_agreement"] == 1.0    # on the CPU: the same computation
    assert d["denoiser"]["eager_fp32"]["eps_max_abs_err_rel_to_max"] == 0.0
    assert d["model"]["denoiser_gflop_per_hypothesis_step"] > 0 and d["denoiser"]["eager_fp32"]["tflops"] > 0
    assert [(r["config"], r["k"]) for r in d["memory"]][:2] == [("eager_fp32", 1), ("eager_fp32", 2)]
    assert all(r["rss_mb"] > 0 for r in d["memory"])
    assert "targets: <= 15.0 ms per image" in p.stdout


def test_device_script_is_one_prepared_command():
    """The lease's command: the exact run-tool call is written at the top of the script and in
    benchmarks/README.md, every phase is time-boxed, everything goes under $OUT."""
    sh = (ROOT / "scripts" / "device_paper_scale.sh").read_text()
    call = next(line for line in sh.splitlines() if "run(command=" in line).strip("# ").strip()
    assert call in (ROOT / "benchmarks" / "README.md").read_text()
    assert ". scripts/device_env.sh" in sh and '"$OUT' in sh     # device_env.sh sources source_tree_env.sh
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device_paper_scale.sh")]).returncode == 0
    assert "# phase: build" in sh and "# phase: tests" in sh and "lidc) limit=" in sh and "cvc) limit=" in sh
    assert 'build_native "$BUILD" 100' in sh and "timeout 40 " in sh and 'timeout "$limit"' in sh


# ---- on a GPU ----------------------------------------------------------------------------------------

@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in fp32 (PyTorch lets cuDNN use TF32 by default)."""
    b = torch.backends
    prev = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = prev


@cuda
def test_cuda_graph_replay_equals_eager_and_the_cpu(ref_model, no_tf32):
    from msld_export.sampling.batched_sampler import BatchedSampler
    cpu = BatchedSampler.from_reference(ref_model, device="cpu").sample(_image(2), k=3, steps=3, seed=7)
    for eta in (0.0, 0.5):
        s = BatchedSampler.from_reference(ref_model, device="cuda", eta=eta)
        eager = s.sample(_image(2), k=3, steps=3, seed=7)
        graph = s.sample(_image(2), k=3, steps=3, seed=7, use_graph=True)
        again = s.sample(_image(2), k=3, steps=3, seed=7, use_graph=True)   # a replay
        torch.testing.assert_close(graph.latents, eager.latents, rtol=0, atol=1e-5)
        assert torch.equal(graph.latents, again.latents)
        if eta == 0.0:
            assert float((eager.probs.cpu() - cpu.probs).abs().max()) < 1e-3


@cuda
def test_cuda_noise_and_update_equal_the_native_cpu(ref_model):
    from msld_export.sampling.batched_sampler import BatchedSampler, ddim_scalars, ddim_update
    from msld_sdk.sampling import Schedule
    s = BatchedSampler.from_reference(ref_model, device="cuda")
    buf = torch.empty(1, 6, 1, 32, 32, device="cuda")
    s._draw(buf, 2 ** 40 + 3, None, 3, 2)
    want = _native.gaussian(2 ** 40 + 3, 0, 3, 32 * 32, 0)
    np.testing.assert_array_equal(buf.reshape(2, 3, -1).cpu().numpy(), np.stack([want, want]))
    rng = np.random.default_rng(1)
    x, e = rng.standard_normal(5000, dtype=np.float32), rng.standard_normal(5000, dtype=np.float32)
    c = Schedule(ref_model.alphas, "linspace_trunc").ddim(20)[3]
    got = ddim_update(torch.from_numpy(x).cuda(), torch.from_numpy(e).cuda(),
                      torch.from_numpy(ddim_scalars(c, 0.0, 1.0)).cuda(), 1.0)
    np.testing.assert_array_equal(got.cpu().numpy(), _native.ddim_step(x, e, c.alpha_t, c.alpha_prev, 0.0, None, 1.0)[0])


@cuda
def test_cuda_dpmpp2m_equals_the_native_cpu(ref_model, no_tf32):
    from msld_export.sampling.batched_sampler import BatchedSampler, dpm2m_scalars, dpm2m_update
    from msld_sdk.sampling import Schedule
    rng = np.random.default_rng(2)
    x, e = rng.standard_normal(5000, dtype=np.float32), rng.standard_normal(5000, dtype=np.float32)
    xn, x0n, xt, x0t = x, None, torch.from_numpy(x).cuda(), None
    et = torch.from_numpy(e).cuda()
    for c in Schedule(ref_model.alphas, "linspace_trunc").dpmpp2m(6):
        xn, x0n = _native.dpmpp2m_step(xn, e, x0n, c.order, c.alpha_t, c.x_coef, c.x0_coef, c.x0_prev_coef, 1.0)
        xt, x0t = dpm2m_update(xt, et, torch.from_numpy(dpm2m_scalars(c, 1.0)).cuda(), 1.0, c.order, x0t)
        np.testing.assert_array_equal(xt.cpu().numpy(), xn)
    cpu = BatchedSampler.from_reference(ref_model, device="cpu", solver="dpmpp2m").sample(_image(2), k=3, steps=4, seed=7)
    s = BatchedSampler.from_reference(ref_model, device="cuda", solver="dpmpp2m")
    eager = s.sample(_image(2), k=3, steps=4, seed=7)
    graph = s.sample(_image(2), k=3, steps=4, seed=7, use_graph=True)
    torch.testing.assert_close(graph.latents, eager.latents, rtol=0, atol=1e-5)
    assert float((eager.probs.cpu() - cpu.probs).abs().max()) < 1e-3


@cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_half_precision_graphs_run_with_fp32_state(ref_model, dtype):
    from msld_export.sampling.batched_sampler import BatchedSampler
    s = BatchedSampler.from_reference(ref_model, device="cuda", dtype=dtype, channels_last=True)
    r = s.sample(_image(), k=4, steps=3, seed=1, use_graph=True)
    assert r.latents.dtype == r.probs.dtype == torch.float32 and torch.isfinite(r.probs).all()
