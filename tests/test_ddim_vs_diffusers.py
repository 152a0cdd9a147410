"""The native DDIM schedule, fused update and loop against diffusers' DDIMScheduler."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from msld_sdk import _native
from msld_sdk.sampling import Schedule

T = 1000


def make_scheduler(spacing, clip=False):
    return DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                         prediction_type="epsilon", timestep_spacing=spacing)


def eps_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A fixed nonlinear stand-in for the denoiser, identical for both trajectories."""
    return torch.tanh(0.7 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + t / (2 * T))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 100])
def test_timesteps_match(spacing, steps):
    s = make_scheduler(spacing)
    s.set_timesteps(steps)
    np.testing.assert_array_equal(_native.ddim_timesteps(T, steps, spacing), s.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_step_by_step_trajectory(spacing, steps, eta, clip):
    sched = make_scheduler(spacing, clip)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.numpy()
    k, shape = 8, (4, 16, 16)
    elems = int(np.prod(shape))
    x_ref = torch.from_numpy(_native.gaussian(7, 0, k, elems, 0).reshape(k, *shape))
    x_sdk = x_ref.numpy().copy()
    table = Schedule(ac, spacing).ddim(steps)   # the SDK's step table, against diffusers' own
    np.testing.assert_array_equal(table.timesteps, sched.timesteps.numpy())
    for i, t in enumerate(sched.timesteps):
        t = int(t)
        c = table[i]
        noise = _native.gaussian(7, 0, k, elems, c.noise_stream).reshape(k, *shape)
        e_ref = eps_model(x_ref, t)
        x_ref = sched.step(e_ref, t, x_ref, eta=eta, variance_noise=torch.from_numpy(noise)).prev_sample
        assert c.prev_timestep == t - T // steps      # diffusers: timestep - T // num_inference_steps
        e_sdk = eps_model(torch.from_numpy(x_sdk), t).numpy()
        x_sdk, _ = _native.ddim_step(x_sdk, e_sdk, c.alpha_t, c.alpha_prev,
                                     eta=eta, noise=noise if eta > 0 else None, clip=1.0 if clip else 0.0)
        assert rel(x_sdk, x_ref.numpy()) < 1e-5, f"step {i} (t={t})"


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_native_loop_matches_diffusers(steps, eta):
    """The whole loop in the extension (noise drawn inside) against diffusers with the same noise."""
    sched = make_scheduler("trailing")
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.numpy().astype(np.float32)
    k, n_images, shape = 5, 2, (4, 8, 8)
    elems = int(np.prod(shape))
    x = np.zeros((n_images * k, *shape), np.float32)
    eps = np.zeros_like(x)
    t = np.zeros((n_images * k,), np.float32)
    cond = np.linspace(-1, 1, n_images * k, dtype=np.float32)[:, None, None, None]
    calls = []

    def denoise():
        calls.append(float(t[0]))
        eps[...] = eps_model(torch.from_numpy(x + cond), float(t[0])).numpy()

    _native.ddim_sample(denoise, ac, steps, "trailing", eta, 0.0, 99, k, n_images, x, eps, t)
    assert len(calls) == steps
    assert calls == [float(v) for v in sched.timesteps]

    noise0 = _native.gaussian(99, 0, k, elems, 0).reshape(k, *shape)
    x_ref = torch.from_numpy(np.concatenate([noise0] * n_images))
    for i, ts in enumerate(sched.timesteps):
        noise = _native.gaussian(99, 0, k, elems, i + 1).reshape(k, *shape)
        e = eps_model(x_ref + torch.from_numpy(cond), int(ts))
        x_ref = sched.step(e, int(ts), x_ref, eta=eta,
                           variance_noise=torch.from_numpy(np.concatenate([noise] * n_images))).prev_sample
    assert rel(x, x_ref.numpy()) < 1e-5


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="spacing"):
        _native.ddim_timesteps(T, 10, "linspace")
    with pytest.raises(ValueError):
        _native.ddim_timesteps(T, 0, "trailing")
    with pytest.raises(ValueError):
        _native.ddim_step(np.zeros(4, np.float32), np.zeros(4, np.float32), 0.5, 0.6, eta=1.0)  # no noise
