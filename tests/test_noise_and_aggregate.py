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
