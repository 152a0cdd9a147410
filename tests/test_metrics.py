"""Metrics against independent implementations: torchmetrics for Dice/IoU/ECE, brute force for GED
and Hungarian-matched IoU."""
import itertools

import numpy as np
import pytest
import torch

from msld_sdk.evaluation import metrics

tm = pytest.importorskip("torchmetrics")


def random_masks(rng, n, shape=(24, 24), p=None):
    out = []
    for _ in range(n):
        q = rng.uniform(0.05, 0.6) if p is None else p
        out.append(rng.random(shape) < q)
    return np.stack(out)


def test_dice_iou_vs_torchmetrics():
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = random_masks(rng, 2)
        ref_iou = float(binary_jaccard_index(torch.from_numpy(a).long(), torch.from_numpy(b).long()))
        assert metrics.iou(a, b) == pytest.approx(ref_iou, abs=1e-6)
        ref_dice = float(binary_f1_score(torch.from_numpy(a).long(), torch.from_numpy(b).long()))  # Dice = F1
        assert metrics.dice(a, b) == pytest.approx(ref_dice, abs=1e-6)
    empty = np.zeros((4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.dice(empty, ~empty) == 0.0


def ged_brute_force(S, Y):
    def d(a, b):
        u = (a | b).sum()
        return 0.0 if u == 0 else 1.0 - (a & b).sum() / u
    sy = np.mean([d(s, y) for s in S for y in Y])
    ss = np.mean([d(s, t) for s in S for t in S])
    yy = np.mean([d(y, z) for y in Y for z in Y])
    return 2 * sy - ss - yy


def test_ged_vs_brute_force():
    rng = np.random.default_rng(1)
    for k, n in [(8, 4), (3, 4), (1, 1), (16, 4)]:
        S, Y = random_masks(rng, k), random_masks(rng, n)
        Y[0] = False  # an annotator who marked nothing
        S[-1] = False
        assert metrics.generalized_energy_distance(S, Y) == pytest.approx(ged_brute_force(S, Y), abs=1e-12)
    same = random_masks(rng, 4)
    assert metrics.generalized_energy_distance(same, same) == pytest.approx(0.0, abs=1e-12)
    z = np.zeros((2, 5, 5), bool)
    assert metrics.generalized_energy_distance(z, z) == 0.0  # empty vs empty: distance 0


def hm_iou_brute_force(S, Y):
    k, n = len(S), len(Y)
    m = int(np.lcm(k, n))
    SS, YY = np.repeat(S, m // k, 0), np.repeat(Y, m // n, 0)
    best = -1.0
    for perm in itertools.permutations(range(m)):
        best = max(best, np.mean([metrics.iou(SS[i], YY[j]) for i, j in enumerate(perm)]))
    return best


def test_hungarian_matched_iou_vs_brute_force():
    rng = np.random.default_rng(2)
    for k, n in [(4, 4), (2, 4), (3, 3), (4, 2)]:
        S, Y = random_masks(rng, k, (8, 8)), random_masks(rng, n, (8, 8))
        assert metrics.hungarian_matched_iou(S, Y) == pytest.approx(hm_iou_brute_force(S, Y), abs=1e-12)


def test_ece_vs_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error
    rng = np.random.default_rng(3)
    p = rng.random((32, 32)).astype(np.float32)
    t = rng.random((32, 32)) < p ** 0.7  # miscalibrated on purpose
    probs2 = torch.from_numpy(np.stack([1 - p.ravel(), p.ravel()], 1))
    ref = float(multiclass_calibration_error(probs2, torch.from_numpy(t.ravel()).long(), num_classes=2, n_bins=10,
                                             norm="l1"))
    assert metrics.expected_calibration_error(p, t, 10) == pytest.approx(ref, abs=1e-5)
    perfect = np.array([0.0, 1.0, 1.0, 0.0])
    assert metrics.expected_calibration_error(perfect, perfect > 0.5) == 0.0


def test_hypothesis_spread_is_the_mean_pairwise_difference():
    from msld_sdk.evaluation.metrics import hypothesis_spread
    a = np.zeros((3, 4, 4), np.float32)
    assert hypothesis_spread(a) == 0.0
    b = np.stack([np.zeros((4, 4)), np.ones((4, 4)), np.full((4, 4), 0.5)])
    assert hypothesis_spread(b) == pytest.approx((1 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError):
        hypothesis_spread(a[:1])
