"""The whole SDK pipeline against a plain PyTorch + diffusers pipeline on the same weights and noise."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from msld_export.model.networks import alphas_cumprod
from msld_sdk import Segmenter, _native
from msld_sdk.evaluation.metrics import hypothesis_spread


def torch_reference(model, image01: np.ndarray, k: int, steps: int, seed: int, eta: float) -> np.ndarray:
    """image01: H x W x C in [0, 1] at the model's size. Returns k x H x W probabilities.

    The raw network output goes to diffusers with the model's ``prediction_type``, so diffusers,
    not our code, turns a clean-latent prediction into the DDIM update."""
    cfg = model.cfg
    mean = torch.tensor(cfg.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, -1, 1, 1)
    x_img = (torch.from_numpy(image01).permute(2, 0, 1)[None] - mean) / std
    sched = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                          beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=False,
                          set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
                          prediction_type=cfg.prediction_type)
    assert torch.equal(sched.alphas_cumprod, alphas_cumprod(cfg))
    sched.set_timesteps(steps)
    L, C = cfg.latent_size, cfg.latent_channels
    with torch.no_grad():
        cond = model.image_vae.encode(x_img)[0].repeat(k, 1, 1, 1)
        x = torch.from_numpy(_native.gaussian(seed, 0, k, C * L * L, 0).reshape(k, C, L, L))
        for i, t in enumerate(sched.timesteps):
            out = model.denoiser(x, torch.full((k,), float(t)), cond)
            noise = torch.from_numpy(_native.gaussian(seed, 0, k, C * L * L, i + 1).reshape(k, C, L, L))
            x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        probs = torch.sigmoid(model.mask_ae.dec(x / cfg.mask_latent_scale))
    return probs[:, 0].numpy()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_sdk_matches_torch_reference(tiny_model, tiny_plan, tiny_x0_model_and_plan, rng, eta, prediction):
    if prediction == "sample":  # the exported graph turns the x0 estimate into eps; diffusers does it here
        tiny_model, tiny_plan = tiny_x0_model_and_plan
    assert tiny_model.cfg.prediction_type == prediction
    S = tiny_model.cfg.image_size
    img = rng.random((S, S), dtype=np.float32)  # at the model's size: no resampling on either side
    k, steps, seed = 6, 20, 2024
    res = Segmenter(tiny_plan).run(img, k=k, steps=steps, seed=seed, eta=eta)
    ref = torch_reference(tiny_model, img[:, :, None], k, steps, seed, eta)
    np.testing.assert_allclose(res.probs, ref, atol=1e-4)
    np.testing.assert_allclose(res.mean, ref.mean(0), atol=1e-4)
    differ = res.masks != (ref > 0.5)
    assert not (differ & (np.abs(ref - 0.5) >= 1e-4)).any()


def test_shipped_default_plan_matches_its_weights_shape(rng):
    """The embedded default runs with no arguments and returns outputs at the input's size."""
    seg = Segmenter()
    img = rng.integers(0, 255, (90, 70), dtype=np.uint8)
    r = seg.run(img, k=2, steps=2, seed=0)
    assert r.masks.shape == (2, 90, 70) and r.masks.dtype == bool
    assert r.mean.shape == (90, 70) and r.mean.dtype == np.float32
    assert r.confidence.shape == (90, 70) and 0 <= r.confidence.min() <= r.confidence.max() <= 1
    assert set(r.timings) >= {"encode_ms", "denoise_ms", "decode_ms", "aggregate_ms", "total_ms"}


def test_shipped_polyp_plan_runs_on_rgb_and_has_int8(rng):
    """Segmenter("polyp"): the trained RGB model, with its int8 denoiser, at the input's size."""
    seg = Segmenter("polyp")
    assert seg.plan.channels == 3 and seg.plan.manifest["provenance"]["trained"] is True
    img = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
    r = seg.run(img, k=2, steps=2, seed=0)
    assert r.masks.shape == (2, 100, 120) and r.mean.shape == (100, 120)
    q = Segmenter("polyp", precision="int8").run(img, k=2, steps=2, seed=0)
    assert np.abs(q.probs - r.probs).mean() < hypothesis_spread(r.probs)  # int8 moves less than another draw
