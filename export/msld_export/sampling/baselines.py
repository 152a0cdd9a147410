"""The ways of running MedSegLatDiff that the SDK is compared with, on the plan's own weights.

(a) research code: PyTorch eager, one hypothesis at a time, the image encoder re-run for
    every hypothesis, diffusers' DDIMScheduler for the update (for plans of the MedSegLatDiff
    reference architecture, ``msld import`` / ``bench_plan``: the reference's own modules and its
    DDIM rule, timesteps ``linspace_trunc`` and x0 clipping, in torch);
(b) ONNX Runtime on the plan's graphs, called once per hypothesis (batch 1), numpy update;
and, for reference-architecture plans, the reference's own default: (a) at DDIM 50 steps.

All draw the same initial noise as the SDK (hypothesis i from the same seed), so with eta=0
they compute the same masks; ``check_same_result`` asserts it before anything is timed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from diffusers import DDIMScheduler

from msld_sdk import _native
from msld_sdk.backends.onnxruntime_backend import session_options
from msld_sdk.checksums import sha256_file as _sha256
from msld_sdk.plan import Plan
from msld_sdk.sampling import Schedule

from ..model.checkpoint import load_checkpoint, random_model
from ..model.config import ModelConfig
from ..model.networks import ExportDecoder, ExportDenoiser, ExportEncoder, MedSegLatDiff

PACKAGE = Path(__file__).resolve().parents[1]   # msld_export/
# shipped with the package; a clone's runs/ (the package is export/msld_export in a clone)
CHECKPOINT_DIRS = (PACKAGE / "checkpoints", PACKAGE.parents[1] / "runs")
REFERENCE_MODEL = "medseglatdiff-reference"   # model.name of plans of the reference architecture
# the reference's own default sampler (3983e93: DDIMSampler, n_infer_steps 50, eta 0), each
# hypothesis sampled on its own (sample(num_sample=1) per hypothesis)
REFERENCE_DEFAULT = {"solver": "ddim", "steps": 50, "eta": 0.0, "hypotheses_per_call": 1}
CHECKPOINT_DIRS_ENV = "MSLD_CHECKPOINT_DIRS"   # more folders (os.pathsep-separated) for an imported plan's checkpoint


def _find_checkpoint(plan: Plan, name: str | None, sha: str | None, dirs) -> Path:
    found = [p for d in dirs if d.exists() for p in d.rglob(name or "?")]
    found = [p for p in found if _sha256(p) == sha]
    if not found:
        raise FileNotFoundError(f"checkpoint {name} (sha256 {str(sha)[:12]}...) of {plan.path} not found under "
                                f"{[str(d) for d in dirs]}")
    return found[0]


class ReferenceTorch:
    """The PyTorch modules of a reference-architecture plan (imported or ``bench_plan``): image
    embedder, denoiser, mask decoder mapped to [0, 1], as the plan's three graphs."""

    def __init__(self, denoiser, embedder, decoder, latent_scaling_factor: float):
        from ..reference.model import DecoderGraph
        self.denoiser, self.embedder = denoiser.eval(), embedder.eval()
        self.decoder = DecoderGraph(decoder, latent_scaling_factor).eval()

    def graph_cases(self, plan: Plan, g: torch.Generator) -> dict:
        m = plan.manifest
        S, ch = m["input"]["size"][0], m["input"]["channels"]
        C, (L, _) = m["latent"]["channels"], m["latent"]["size"]
        z = torch.randn(2, C, L, L, generator=g)
        cond = torch.randn(2, m["condition"]["channels"], L, L, generator=g)
        return {"encoder": (self.embedder, {"image": torch.randn(2, ch, S, S, generator=g)}),
                "denoiser": (self.denoiser, {"x": z, "t": torch.tensor([900.0, 50.0]), "cond": cond}),
                "decoder": (self.decoder, {"z": z})}


def _reference_torch_for_plan(plan: Plan) -> ReferenceTorch:
    m, prov = plan.manifest["model"], plan.manifest.get("provenance", {})
    if prov.get("random_weights"):
        from ..reference.bench_plan import rebuild_random_modules
        mods = rebuild_random_modules(m["denoiser"], m["image_embedder"], m["mask_decoder"], int(prov["random_seed"]))
    else:
        from ..reference.importer import ImportedModel
        extra = [Path(p) for p in os.environ.get(CHECKPOINT_DIRS_ENV, "").split(os.pathsep) if p]
        ckpt = _find_checkpoint(plan, prov.get("checkpoint"), prov.get("checkpoint_sha256"),
                                (*CHECKPOINT_DIRS, *extra))
        im = ImportedModel(ckpt, prov["config"])
        mods = (im.denoiser, im.embedder, im.decoder)
    return ReferenceTorch(*mods, m["latent_scaling_factor"])


def is_reference_plan(plan: Plan) -> bool:
    """A plan of the reference architecture (``msld import`` or ``bench_plan``)."""
    return plan.manifest["model"].get("name") == REFERENCE_MODEL


def torch_model_for_plan(plan: Plan):
    """The PyTorch model whose weights the plan's graphs hold, proven by comparing outputs:
    a ``MedSegLatDiff`` for this package's own plans, a ``ReferenceTorch`` for plans of the
    reference architecture."""
    prov = plan.manifest.get("provenance", {})
    if is_reference_plan(plan):
        model = _reference_torch_for_plan(plan)
    elif prov.get("trained"):
        model, _ = load_checkpoint(_find_checkpoint(plan, prov.get("checkpoint"), prov.get("checkpoint_sha256"),
                                                    CHECKPOINT_DIRS))
    else:
        model = random_model(ModelConfig.from_dict(plan.manifest["model"]), int(prov.get("random_seed", 0)))
    verify_against_plan(model, plan)
    return model


def _own_graph_cases(model: MedSegLatDiff, g: torch.Generator) -> dict:
    cfg = model.cfg
    L, S = cfg.latent_size, cfg.image_size
    z = torch.randn(2, cfg.latent_channels, L, L, generator=g)
    return {
        "encoder": (ExportEncoder(model), {"image": torch.randn(2, cfg.image_channels, S, S, generator=g)}),
        "denoiser": (ExportDenoiser(model), {"x": z, "t": torch.tensor([900.0, 50.0]), "cond": z.flip(0)}),
        "decoder": (ExportDecoder(model), {"z": z}),
    }


def verify_against_plan(model, plan: Plan, tol: float = 1e-4) -> None:
    g = torch.Generator().manual_seed(0)
    cases = model.graph_cases(plan, g) if isinstance(model, ReferenceTorch) else _own_graph_cases(model, g)
    for part, (mod, feeds) in cases.items():
        sess = ort.InferenceSession(plan.blob(part), providers=["CPUExecutionProvider"])
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        with torch.no_grad():
            ref = mod(*feeds.values()).numpy()
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
        if err > tol:
            raise ValueError(f"{plan.path}: PyTorch weights do not match the plan's {part} graph (rel err {err:.1e})")


def _scheduler(plan: Plan, steps: int) -> DDIMScheduler:
    sch = plan.manifest["schedule"]
    s = DDIMScheduler(num_train_timesteps=sch["num_train_timesteps"], beta_schedule=sch["beta_schedule"],
                      beta_start=sch["beta_start"], beta_end=sch["beta_end"], clip_sample=False,
                      set_alpha_to_one=True, steps_offset=0, timestep_spacing=sch["spacing"])
    s.set_timesteps(steps)
    return s


def _normalise(plan: Plan, img01: np.ndarray) -> np.ndarray:
    """H x W (x C) in [0,1] at the plan's size -> 1 x C x H x W."""
    inp = plan.manifest["input"]
    a = img01 if img01.ndim == 3 else img01[:, :, None]
    m = np.asarray(inp["mean"], np.float32)[:, None, None]
    s = np.asarray(inp["std"], np.float32)[:, None, None]
    return ((a.transpose(2, 0, 1) - m) / s)[None].astype(np.float32)


def _reference_eager_per_hypothesis(model: ReferenceTorch, plan: Plan, img01: np.ndarray, k: int, steps: int,
                                    seed: int) -> np.ndarray:
    """(a) for the reference architecture: its modules, one hypothesis at a time, the embedder
    re-run per hypothesis (the reference's ui.py n_ensemble loop), its DDIM rule in torch float32
    (``batched_sampler.per_hypothesis_eager``, which the GPU benchmark runs on the device too)."""
    from .batched_sampler import per_hypothesis_eager
    sch = plan.manifest["schedule"]
    return per_hypothesis_eager(model.embedder, model.denoiser, model.decoder, sch["alphas_cumprod"],
                                torch.from_numpy(_normalise(plan, img01)), k=k, steps=steps, seed=seed,
                                spacing=sch["spacing"], clip=float(sch.get("clip_sample", 0.0))).numpy()


def torch_eager_per_hypothesis(model, plan: Plan, img01: np.ndarray, k: int, steps: int,
                               seed: int) -> np.ndarray:
    """(a) k x H x W probabilities, the research-code way."""
    if isinstance(model, ReferenceTorch):
        return _reference_eager_per_hypothesis(model, plan, img01, k, steps, seed)
    sched = _scheduler(plan, steps)
    cfg = model.cfg
    L, C = cfg.latent_size, cfg.latent_channels
    x_img = torch.from_numpy(_normalise(plan, img01))
    out = []
    with torch.no_grad():
        for i in range(k):
            cond = model.image_vae.encode(x_img)[0]  # re-run per hypothesis, as research code does
            x = torch.from_numpy(_native.gaussian(seed, i, 1, C * L * L, 0).reshape(1, C, L, L))
            for t in sched.timesteps:
                eps = model.predict_eps(x, t.float().view(1), cond)
                x = sched.step(eps, t, x, eta=0.0).prev_sample
            out.append(torch.sigmoid(model.mask_ae.dec(x / cfg.mask_latent_scale))[0, 0].numpy())
    return np.stack(out)


class OrtPerHypothesis:
    """(b) ONNX Runtime on the plan's graphs, one hypothesis (batch 1) per call, numpy DDIM.

    By default ONNX Runtime's default session settings at the SDK's thread count, the way a
    user would first call it; ``sdk_settings=True`` gives it the SDK's own session settings,
    so that the ratio to the SDK measures only batching and the native loop."""

    def __init__(self, plan: Plan, threads: int, sdk_settings: bool = False):
        if sdk_settings:
            opts = session_options(threads)
        else:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
        self.plan = plan
        self.sess = {p: ort.InferenceSession(plan.blob(p), opts, providers=["CPUExecutionProvider"])
                     for p in ("encoder", "denoiser", "decoder")}
        self.schedule = Schedule.from_plan(plan)
        self.clip = self.schedule.clip   # x0 clipping (reference plans)

    def __call__(self, img01: np.ndarray, k: int, steps: int, seed: int) -> np.ndarray:
        C, (L, _) = self.plan.manifest["latent"]["channels"], self.plan.manifest["latent"]["size"]
        table = self.schedule.ddim(steps)
        x_img = _normalise(self.plan, img01)
        out = []
        for i in range(k):
            cond = self.sess["encoder"].run(None, {"image": x_img})[0]
            x = _native.gaussian(seed, i, 1, C * L * L, 0).reshape(1, C, L, L)
            for c in table:
                t = np.array([c.timestep], np.float32)
                eps = self.sess["denoiser"].run(None, {"x": x, "t": t, "cond": cond})[0]
                a_t, a_p = np.float32(c.alpha_t), np.float32(c.alpha_prev)   # the plan's float32 alphas
                x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
                if self.clip > 0:
                    x0 = np.clip(x0, -self.clip, self.clip)
                x = (np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps).astype(np.float32)
            out.append(self.sess["decoder"].run(None, {"z": x})[0][0, 0])
        return np.stack(out)


def check_same_result(sdk_probs: np.ndarray, *others: np.ndarray, tol: float = 1e-3) -> None:
    for o in others:
        err = float(np.abs(sdk_probs - o).max())
        if err > tol:
            raise AssertionError(f"baseline disagrees with the SDK: max |prob diff| {err:.2e} > {tol}")


def measure_baselines(plan: Plan, img01: np.ndarray, sdk_probs: np.ndarray, k: int, steps: int, seed: int,
                      repeats: int, threads: int, reference_default=None) -> dict:
    """Median ms of (a) and (b) on the same image, k, steps and seed as the SDK run whose
    probabilities are ``sdk_probs``; both are first checked to give the same result.

    ``reference_default``: for a reference-architecture plan, ``(steps, sdk_probs_at_those_steps,
    sdk_call)``: the reference's default loop is timed too (``time_reference_default``)."""
    from msld_sdk.tools.bench import time_calls

    torch.set_num_threads(threads)
    model = torch_model_for_plan(plan)
    ort_b = OrtPerHypothesis(plan, threads)
    ort_b_tuned = OrtPerHypothesis(plan, threads, sdk_settings=True)
    check_same_result(sdk_probs, torch_eager_per_hypothesis(model, plan, img01, k, steps, seed),
                      ort_b(img01, k, steps, seed), ort_b_tuned(img01, k, steps, seed))
    # the check runs above were each way's warm-up (at the paper's scale one run takes minutes)
    ta = time_calls(lambda: torch_eager_per_hypothesis(model, plan, img01, k, steps, seed), repeats, warmup=0)
    tb = time_calls(lambda: ort_b(img01, k, steps, seed), repeats, warmup=0)
    tb1 = time_calls(lambda: ort_b_tuned(img01, k, steps, seed), repeats, warmup=0)
    out = {"torch_eager_per_hypothesis_ms": float(np.median(ta)), "ort_per_hypothesis_ms": float(np.median(tb)),
           "ort_per_hypothesis_sdk_settings_ms": float(np.median(tb1)),
           "torch_eager_per_hypothesis_all_ms": ta, "ort_per_hypothesis_all_ms": tb,
           "ort_per_hypothesis_sdk_settings_all_ms": tb1,
           "baselines_checked_same_result": True, "torch": torch.__version__}
    if reference_default is not None:
        out["reference_default"] = time_reference_default(model, plan, img01, k, seed, repeats, *reference_default)
    return out


def time_reference_default(model: ReferenceTorch, plan: Plan, img01: np.ndarray, k: int, seed: int, repeats: int,
                           steps: int, sdk_probs: np.ndarray, sdk_call) -> dict:
    """The reference's own default on the plan's weights: (a) at DDIM ``steps`` (``REFERENCE_DEFAULT``'s
    50 unless a test overrides it), eta 0, one hypothesis at a time, k hypotheses. Checked first
    against ``sdk_probs`` (the SDK at DDIM ``steps``, same seed) by ``check_same_result``; then
    timed ``repeats`` times interleaved with ``sdk_call`` (the SDK at the user's settings), so that
    machine noise hits both alike and their ratio comes from one run."""
    from msld_sdk.tools.bench import time_interleaved

    def run():
        return _reference_eager_per_hypothesis(model, plan, img01, k, steps, seed)

    check_same_result(sdk_probs, run())   # the check run is also the warm-up
    t = time_interleaved({"ref": run, "sdk": sdk_call}, repeats, warmup=0)
    ref, sdk = t["ref"], t["sdk"]
    ref_ms, sdk_ms = float(np.median(ref)), float(np.median(sdk))
    return {**REFERENCE_DEFAULT, "steps": steps, "k": k, "seed": seed,
            "steps_overridden": steps != REFERENCE_DEFAULT["steps"],
            "way": "the reference's modules in PyTorch eager float32, one hypothesis at a time, the image "
                   "embedder re-run per hypothesis, its DDIM rule (linspace_trunc timesteps, x0 clipping)",
            "checked_same_result": True, "median_ms": ref_ms, "all_ms": ref, "repeats": repeats,
            "sdk_interleaved_ms": sdk_ms, "sdk_interleaved_all_ms": sdk, "speedup": ref_ms / sdk_ms}
