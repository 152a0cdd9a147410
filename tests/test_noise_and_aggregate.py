"""Counter-based Gaussian noise and one-pass aggregation against independent references."""
import numpy as np
import pytest
from scipy import stats

from msld_sdk import _native


def test_noise_is_standard_normal():
    z = _native.gaussian(123, 0, 16, 4096, 0).ravel().astype(np.float64)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    # Kolmogorov-Smirnov against N(0, 1): a broken Box-Muller or counter layout fails this.
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # no correlation between neighbouring elements or between hypotheses
    a = z.reshape(16, 4096)
    assert abs(np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(a[0], a[1])[0, 1]) < 0.06


def test_noise_keyed_by_seed_hypothesis_stream_element():
    full = _native.gaussian(5, 0, 8, 1001, 3)
    np.testing.assert_array_equal(_native.gaussian(5, 2, 3, 1001, 3), full[2:5])   # any hyp range
    np.testing.assert_array_equal(_native.gaussian(5, 0, 8, 1001, 3), full)         # repeatable
    np.testing.assert_array_equal(_native.gaussian(5, 0, 8, 17, 3), full[:, :17])  # element prefix
    assert not np.array_equal(_native.gaussian(6, 0, 8, 1001, 3), full)            # seed matters
    assert not np.array_equal(_native.gaussian(5, 0, 8, 1001, 4), full)            # stream matters
    assert not np.array_equal(full[0], full[1])                                     # hypotheses differ
    big = _native.gaussian(2**63 + 11, 0, 1, 8, 0)                                  # full 64-bit seeds
    assert not np.array_equal(big, _native.gaussian(11, 0, 1, 8, 0))


def aggregate_reference(probs: np.ndarray, thr: float):
    """Plain numpy with the documented definitions (sequential float32 sum)."""
    k = probs.shape[0]
    masks = probs > thr
    s = np.zeros(probs.shape[1:], np.float32)
    for i in range(k):
        s = s + probs[i]
    mean = s * np.float32(1.0 / k)
    votes = masks.sum(0)
    p = votes.astype(np.float32) / np.float32(k)
    conf = np.float32(1) - np.float32(2) * np.sqrt(p * (np.float32(1) - p))
    return masks, mean, conf, 2 * votes > k


@pytest.mark.parametrize("k", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (128, 128), (300, 257)])
def test_aggregate_matches_numpy_exactly(k, shape, rng):
    probs = rng.random((k, *shape), dtype=np.float32)
    probs[:, ::3] = 0.5  # exactly at the threshold: not foreground
    got = _native.aggregate(probs, 0.5)
    for g, r, name in zip(got, aggregate_reference(probs, 0.5), ["masks", "mean", "confidence", "consensus"]):
        assert g.dtype == r.dtype, name
        np.testing.assert_array_equal(g, r, err_msg=name)
    conf = got[2]
    assert conf.min() >= 0 and conf.max() <= 1


# ---- the bindings' contract at the edges ----------------------------------------------------------
def _loop_args(k=2, elems=8, steps=3):
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)).astype(np.float32)
    x = np.zeros((k, elems), np.float32)
    return ac, x, np.zeros_like(x), np.zeros(k, np.float32)


def test_a_callbacks_error_keeps_its_own_traceback():
    """The exception raised inside the denoiser is re-raised after the loop with the frames where it
    was raised (a user debugging a custom denoiser sees their own line)."""
    import traceback
    ac, x, eps, t = _loop_args()

    def deep_inside_the_denoiser():
        raise KeyError("from the callback")

    with pytest.raises(KeyError) as e:
        _native.ddim_sample(lambda: deep_inside_the_denoiser(), ac, 3, "trailing", 0.0, 0.0, 1, 2, 1, x, eps, t)
    assert "deep_inside_the_denoiser" in "".join(traceback.format_exception(e.value))


def test_progress_return_values_follow_python_truth():
    ac, x, eps, t = _loop_args()
    calls = []

    def den():
        calls.append(1)
        eps[:] = 0

    _native.ddim_sample(den, ac, 3, "trailing", 0.0, 0.0, 1, 2, 1, x, eps, t, progress=lambda d, n: "yes")
    assert len(calls) == 3                                                    # truthy: go on
    with pytest.raises(RuntimeError, match="cancelled"):
        _native.ddim_sample(den, ac, 3, "trailing", 0.0, 0.0, 1, 2, 1, x, eps, t, progress=lambda d, n: [])
    with pytest.raises(ValueError, match="truth value of an array"):           # its own error, not a cast error
        _native.ddim_sample(den, ac, 3, "trailing", 0.0, 0.0, 1, 2, 1, x, eps, t,
                            progress=lambda d, n: np.zeros(3))


@pytest.mark.parametrize("grid", [[999.9, 500.7, 0.5], np.array([2**32 + 999, 500, 0], np.int64), [999, -1, 0]])
def test_timestep_grids_must_be_whole_timesteps_in_range(grid):
    ac, x, eps, t = _loop_args()
    with pytest.raises(ValueError, match="timesteps must be"):
        _native.dpmpp2m_coefficients(ac, 3, "trailing", grid)
    with pytest.raises(ValueError, match="timesteps must be"):
        _native.ddim_sample(lambda: None, ac, 3, "trailing", 0.0, 0.0, 1, 2, 1, x, eps, t, solver="dpmpp2m",
                            timesteps=grid)


def test_ddim_step_towards_more_noise_and_its_argument_range():
    """eta 0 from alpha_t 0.5 to alpha_prev 0.3 (an inversion step) is the closed form (the eps term
    was silently dropped: a NaN noise scale); with eta > 0, or alpha_prev > 1, it is refused."""
    x, eps = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    got, _ = _native.ddim_step(x.copy(), eps, 0.5, 0.3, 0.0)
    x0 = (1 - np.sqrt(np.float32(0.5)) * 0.5) / np.sqrt(np.float32(0.5))
    np.testing.assert_allclose(got, np.sqrt(0.3) * x0 + np.sqrt(0.7) * 0.5, rtol=1e-6)
    for a_prev, eta in ((0.3, 0.5), (1.5, 0.0), (0.6, float("inf"))):
        with pytest.raises(ValueError):
            _native.ddim_step(x.copy(), eps, 0.5, a_prev, eta, noise=np.zeros(4, np.float32))
