"""Segmentation and uncertainty metrics, as the paper and the multi-annotator literature define them.

All masks are boolean arrays of the same H x W. Conventions (stated because papers differ):
  * Dice and IoU of two empty masks are 1 (perfect agreement on "nothing there").
  * GED (generalized energy distance) uses d = 1 - IoU, with d(empty, empty) = 0:
        GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]
    over all pairs of samples S, S' and annotations Y, Y' (pairs with themselves included, as in
    Kohl et al. 2018's implementation).
  * HM-IoU: Hungarian-matched IoU between the k hypotheses and the annotations: each
    annotation is replicated to k (or k to the annotations) as in Kohl et al. 2019, and the
    matching maximises the summed IoU.
  * ECE: expected calibration error of the pixel-wise prediction "foreground if p > 0.5" with
    confidence max(p, 1 - p), against the ground-truth label, over equal-width bins of [0, 1]
    (the usual two-class definition, as torchmetrics' MulticlassCalibrationError).
"""
from __future__ import annotations

import numpy as np

from ..errors import MissingExtraError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    u = int((a | b).sum())
    return 1.0 if u == 0 else int((a & b).sum()) / u


def _iou_matrix(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """IoU of every pair (x_i, y_j); two empty masks have IoU 1."""
    xf = xs.reshape(len(xs), -1).astype(np.float64)
    yf = ys.reshape(len(ys), -1).astype(np.float64)
    inter = xf @ yf.T
    union = xf.sum(1)[:, None] + yf.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return m


def generalized_energy_distance(samples: np.ndarray, annotations: np.ndarray) -> float:
    """GED^2 between k samples and n annotations (k x H x W and n x H x W booleans)."""
    d_sy = 1.0 - _iou_matrix(samples, annotations)
    d_ss = 1.0 - _iou_matrix(samples, samples)
    d_yy = 1.0 - _iou_matrix(annotations, annotations)
    return float(2 * d_sy.mean() - d_ss.mean() - d_yy.mean())


def linear_sum_assignment():
    """scipy's Hungarian matching, which HM-IoU needs (the [eval] extra); one line naming the
    extra when scipy is not installed."""
    try:
        from scipy.optimize import linear_sum_assignment as lsa
    except ImportError as e:
        raise MissingExtraError("HM-IoU (data with several annotators) needs scipy: "
                                "pip install 'msld_sdk[eval]'") from e
    return lsa


def hungarian_matched_iou(samples: np.ndarray, annotations: np.ndarray) -> float:
    """Mean IoU of the best one-to-one matching, after replicating both sides to lcm(k, n)."""
    k, n = len(samples), len(annotations)
    m = int(np.lcm(k, n))
    cost = _iou_matrix(np.repeat(samples, m // k, axis=0), np.repeat(annotations, m // n, axis=0))
    r, c = linear_sum_assignment()(cost, maximize=True)
    return float(cost[r, c].mean())


def calibration_bins(prob: np.ndarray, target: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of confidence, sum of correct) for pixel-wise calibration; add these
    up over images, then call ``ece_from_bins``."""
    p = prob.ravel().astype(np.float64)
    t = target.ravel().astype(bool)
    conf = np.maximum(p, 1 - p)
    correct = (p > 0.5) == t
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)  # equal-width bins over [0, 1]
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    s_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    s_corr = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    return count, s_conf, s_corr


def ece_from_bins(count: np.ndarray, s_conf: np.ndarray, s_corr: np.ndarray) -> float:
    total = count.sum()
    if total == 0:
        return 0.0
    nz = count > 0
    return float((np.abs(s_conf[nz] - s_corr[nz])).sum() / total)


def expected_calibration_error(prob: np.ndarray, target: np.ndarray, n_bins: int = 10) -> float:
    return ece_from_bins(*calibration_bins(prob, target, n_bins))


def hypothesis_spread(probs: np.ndarray) -> float:
    """Mean absolute probability difference between two distinct hypotheses of one image
    (k x H x W): how much the sampler itself varies, the scale against which a perturbation
    of the pipeline (int8, another kernel) is small or not."""
    p = np.asarray(probs, np.float64).reshape(len(probs), -1)
    k = len(p)
    if k < 2:
        raise ValueError("hypothesis_spread needs at least two hypotheses")
    total = sum(np.abs(p[i] - p[j]).mean() for i in range(k) for j in range(i + 1, k))
    return float(total / (k * (k - 1) / 2))
