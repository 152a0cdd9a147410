"""The native DPM-Solver++(2M) schedule, fused update and loop against diffusers'
DPMSolverMultistepScheduler (algorithm_type "dpmsolver++", solver_order 2, diffusers' defaults)."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from msld_sdk import _native
from msld_sdk.errors import InputError
from msld_sdk.sampling import SampleOptions, Schedule

T = 1000


class ClippingDPMSolver(DPMSolverMultistepScheduler):
    """diffusers' scheduler with the plan's x0 clipping applied to its data prediction (diffusers has
    no clip_sample here; the SDK clips x0 exactly where this does)."""

    clip = 0.0

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        x0 = super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        return x0.clamp(-self.clip, self.clip) if self.clip > 0 else x0


def make_scheduler(spacing, clip=0.0):
    s = ClippingDPMSolver(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                          timestep_spacing=spacing)
    s.clip = clip
    return s


def eps_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A fixed nonlinear stand-in for the denoiser, identical for both trajectories."""
    return torch.tanh(0.7 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + t / (2 * T))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def set_timesteps(sched, spacing, steps, ac):
    """diffusers' own rule for leading/trailing; for the reference's linspace_trunc (no diffusers
    spacing) the SDK's timesteps are handed to diffusers, which then runs its own update on them."""
    if spacing == "linspace_trunc":
        sched.set_timesteps(timesteps=[int(v) for v in _native.dpmpp2m_timesteps(T, steps, spacing)])
    else:
        sched.set_timesteps(steps)


def assert_steps_match(sched, table, clip, k, shape, seed):
    """Each native fused step from the same state as diffusers' ``sched.step``, within 1e-5 relative,
    on the SDK's ``table`` (whose timesteps must be the scheduler's)."""
    np.testing.assert_array_equal(table.timesteps, sched.timesteps.numpy())
    x_ref = torch.from_numpy(_native.gaussian(seed, 0, k, int(np.prod(shape)), 0).reshape(k, *shape))
    x_sdk, x0_prev = x_ref.numpy().copy(), None
    for i, t in enumerate(int(v) for v in sched.timesteps):
        c = table[i]
        x_ref = sched.step(eps_model(x_ref, t), t, x_ref).prev_sample
        e_sdk = eps_model(torch.from_numpy(x_sdk), t).numpy()
        x_sdk, x0_prev = _native.dpmpp2m_step(x_sdk, e_sdk, x0_prev, c.order, c.alpha_t, c.x_coef, c.x0_coef,
                                              c.x0_prev_coef, clip=clip)
        assert rel(x_sdk, x_ref.numpy()) < 1e-5, f"step {i} (t={t}, order {c.order})"


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 6, 10, 20, 50])
def test_timesteps_match(spacing, steps):
    s = make_scheduler(spacing)
    s.set_timesteps(steps)
    np.testing.assert_array_equal(_native.dpmpp2m_timesteps(T, steps, spacing), s.timesteps.numpy())


def test_linspace_trunc_timesteps_are_ddims():
    for steps in (3, 6, 20):
        np.testing.assert_array_equal(_native.dpmpp2m_timesteps(T, steps, "linspace_trunc"),
                                      _native.ddim_timesteps(T, steps, "linspace_trunc"))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc"])
@pytest.mark.parametrize("steps", [2, 3, 5, 6, 10, 20])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_step_by_step_trajectory(spacing, steps, clip):
    sched = make_scheduler(spacing, clip)
    ac = sched.alphas_cumprod.numpy()
    set_timesteps(sched, spacing, steps, ac)
    table = Schedule(ac, spacing, clip=clip).dpmpp2m(steps)   # the SDK's step table, against diffusers'
    assert_steps_match(sched, table, clip, k=6, shape=(4, 16, 16), seed=7)
    assert [c.order for c in table] == ([1] if steps == 1 else [1] + [2] * (steps - 2) + [1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_trunc"])
@pytest.mark.parametrize("steps", [4, 8])
def test_native_loop_matches_diffusers(spacing, steps):
    """The whole loop in the extension (initial noise drawn inside) against diffusers."""
    sched = make_scheduler(spacing)
    ac = sched.alphas_cumprod.numpy().astype(np.float32)
    set_timesteps(sched, spacing, steps, ac)
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

    _native.ddim_sample(denoise, ac, steps, spacing, 0.0, 0.0, 99, k, n_images, x, eps, t, solver="dpmpp2m")
    assert calls == [float(v) for v in sched.timesteps]

    noise0 = _native.gaussian(99, 0, k, elems, 0).reshape(k, *shape)
    x_ref = torch.from_numpy(np.concatenate([noise0] * n_images))
    for ts in sched.timesteps:
        x_ref = sched.step(eps_model(x_ref + torch.from_numpy(cond), int(ts)), int(ts), x_ref).prev_sample
    assert rel(x, x_ref.numpy()) < 1e-5


def test_hypothesis_depends_only_on_seed_and_index():
    ac = make_scheduler("trailing").alphas_cumprod.numpy().astype(np.float32)
    shape = (4, 8, 8)

    def run(k):
        x = np.zeros((k, *shape), np.float32)
        eps, t = np.zeros_like(x), np.zeros((k,), np.float32)

        def denoise():
            eps[...] = eps_model(torch.from_numpy(x), float(t[0])).numpy()
        _native.ddim_sample(denoise, ac, 6, "trailing", 0.0, 1.0, 5, k, 1, x, eps, t, solver="dpmpp2m")
        return x

    np.testing.assert_array_equal(run(3), run(7)[:3])


def test_invalid_arguments_raise():
    ac = make_scheduler("trailing").alphas_cumprod.numpy().astype(np.float32)
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="eta 0"):
        _native.ddim_sample(lambda: None, ac, 5, "trailing", 0.5, 0.0, 1, 2, 1, x, x.copy(),
                            np.zeros(2, np.float32), solver="dpmpp2m")
    with pytest.raises(ValueError, match="solver"):
        _native.ddim_sample(lambda: None, ac, 5, "trailing", 0.0, 0.0, 1, 2, 1, x, x.copy(),
                            np.zeros(2, np.float32), solver="euler")
    with pytest.raises(ValueError):
        _native.dpmpp2m_timesteps(T, T, "leading")   # diffusers' leading rule needs steps < T
    with pytest.raises(ValueError, match="x0_prev"):
        _native.dpmpp2m_step(x, x, None, 2, 0.5, 0.9, 0.1, -0.05)


def test_sample_options_refuse_eta_with_dpmpp2m():
    d = {"k": 4, "max_k": 8, "steps": 10}
    with pytest.raises(InputError, match="eta 0 only"):
        SampleOptions.resolve(d, T, (64, 64), seed=0, eta=0.5, solver="dpmpp2m")
    with pytest.raises(InputError, match="solver must be one of"):
        SampleOptions.resolve(d, T, (64, 64), seed=0, solver="unipc")
    assert SampleOptions.resolve(dict(d, solver="dpmpp2m"), T, (64, 64), seed=0).solver == "dpmpp2m"
    assert SampleOptions.resolve(dict(d, solver="dpmpp2m"), T, (64, 64), seed=0, solver="ddim").solver == "ddim"
