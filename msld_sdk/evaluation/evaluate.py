"""``msld eval``: run a plan over a labelled split and report the paper's metrics.

The JSON report also lists every image's figures with its id (``per_image``), so that a
spread over cases, video sequences or patients can be computed from it.

Per image: Dice and IoU of the consensus mask (majority of the k hypotheses), of the mean
mask (mean probability > 0.5), and the mean over hypotheses of each hypothesis' Dice/IoU,
all against the reference mask; for multi-annotator data the reference is the 50 %
consensus of the annotators (a pixel marked by at least half of them), and GED and HM-IoU
compare the k hypotheses with all annotations. ECE pools every pixel of the split.
Everything is computed at the model's input size, where the reference masks were resized.

Each image is sampled with its own seed, ``image_seed(seed, index)``.  With one seed for all,
every image would get the same k noise draws and the split's mean would move with that one
draw (docs/evaluation.md, "Seeds").
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..sampling import check_seed
from ..input_checks import collect_warnings
from . import metrics


@dataclass
class Sample:
    image: np.ndarray          # H x W x C float in [0, 1]
    annotations: np.ndarray    # A x H x W bool (A = 1 for single-annotator data)
    id: str = ""


@dataclass
class _Acc:
    values: dict = field(default_factory=dict)

    def add(self, name: str, v: float) -> None:
        self.values.setdefault(name, []).append(float(v))

    def means(self) -> dict:
        return {k: float(np.mean(v)) for k, v in self.values.items()}

    def counts(self) -> dict:
        return {k: len(v) for k, v in self.values.items()}


def samples_of(data):
    """The ``Sample``s of a ``SegData`` split (uint8 C x H x W images, masks > 0), one at a time."""
    for i in range(len(data)):
        yield Sample(data.images[i].transpose(1, 2, 0).astype(np.float32) / 255.0, data.masks[i] > 0, data.ids[i])


def reference_mask(annotations: np.ndarray) -> np.ndarray:
    """50 % consensus: marked by at least half of the annotators (the only one if A = 1)."""
    return annotations.sum(0) * 2 >= annotations.shape[0] if annotations.shape[0] > 1 else annotations[0]


SEED_SCHEME = "per image: numpy SeedSequence([seed, index]).generate_state(1, uint64)"


def image_seed(seed: int, index: int) -> int:
    """The sampling seed of the ``index``-th image of a split evaluated with ``seed``."""
    seed = check_seed(seed)
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def evaluate(segmenter, samples: Iterable[Sample], k: int, steps: int | None, seed: int = 0,
             progress=None, views: int | None = None, threshold: float | None = None,
             solver: str | None = None, timesteps=None) -> dict:
    """Metrics over ``samples`` (see the module docstring). ``progress(n_done)`` is called per image.
    ``timesteps``: as ``Segmenter.run``'s (a dpmpp2m grid, or "spacing" for the plan's rule).
    The input checks' warnings (e.g. colour photos given to a greyscale CT plan) are logged once
    and listed in the report's ``input_warnings``."""
    with collect_warnings() as warned:
        out = _evaluate(segmenter, samples, k, steps, seed, progress, views, threshold, solver, timesteps)
    if warned:
        per_image = out.pop("per_image")
        out["input_warnings"] = list(warned)
        out["per_image"] = per_image
    return out


def _evaluate(segmenter, samples, k, steps, seed, progress, views, threshold, solver=None, timesteps=None) -> dict:
    acc, acc_major = _Acc(), _Acc()
    per_image = []
    bins = None
    n = 0
    used_views = views or 1
    used_solver = solver or segmenter.defaults.get("solver", "ddim")
    used_grid, used_steps = None, steps or segmenter.defaults["steps"]
    t0 = time.perf_counter()
    for s in samples:
        r = segmenter.run([s.image], k=k, steps=steps, seed=image_seed(seed, n),
                          **({} if views is None else {"views": views}),
                          **({} if threshold is None else {"threshold": threshold}),
                          **({} if solver is None else {"solver": solver}),
                          **({} if timesteps is None else {"timesteps": timesteps}))[0]
        used_solver = getattr(r, "solver", "ddim")
        used_grid = getattr(r, "timesteps", None)
        used_steps = r.steps
        used_views = getattr(r, "views", 1)
        ann = s.annotations.astype(bool)
        ref = reference_mask(ann)
        mean_mask = r.mean > 0.5
        row = {
            "dice_consensus": metrics.dice(r.consensus, ref), "iou_consensus": metrics.iou(r.consensus, ref),
            "dice_mean_mask": metrics.dice(mean_mask, ref), "iou_mean_mask": metrics.iou(mean_mask, ref),
            "dice_per_hypothesis": float(np.mean([metrics.dice(m, ref) for m in r.masks])),
            "iou_per_hypothesis": float(np.mean([metrics.iou(m, ref) for m in r.masks])),
        }
        if ann.shape[0] > 1:
            row["ged"] = metrics.generalized_energy_distance(r.masks, ann)
            row["hm_iou"] = metrics.hungarian_matched_iou(r.masks, ann)
        for name, v in row.items():
            acc.add(name, v)
        per_image.append({"id": s.id, **row})
        if ann.shape[0] > 1 and ann.reshape(ann.shape[0], -1).any(1).sum() * 2 > ann.shape[0]:
            for name in ("dice_consensus", "iou_consensus", "dice_mean_mask", "iou_mean_mask"):
                acc_major.add(name, row[name])
        b = metrics.calibration_bins(r.mean, ref)
        bins = b if bins is None else tuple(x + y for x, y in zip(bins, b))
        n += 1
        if progress:
            progress(n)
    out = {"n_images": n, "k": k, "steps": used_steps, "seed": seed,
           "views": used_views, "solver": used_solver, **({} if threshold is None else {"threshold": threshold}),
           **({} if used_grid is None else {"timesteps": list(used_grid)}),
           "seed_scheme": SEED_SCHEME,
           "metrics": acc.means(), "ece": metrics.ece_from_bins(*bins) if bins is not None else None,
           "seconds": time.perf_counter() - t0}
    if acc_major.values:
        out["majority_marked"] = {"n_images": acc_major.counts()["dice_consensus"], "metrics": acc_major.means()}
    out["per_image"] = per_image   # last: figures per case, e.g. for a spread over sequences or patients
    return out


def format_report(rep: dict) -> str:
    m = rep["metrics"]
    lines = [f"images {rep['n_images']}  k={rep['k']}  steps={rep['steps']}  solver={rep.get('solver', 'ddim')}  "
             f"views={rep.get('views', 1)}  "
             f"seed={rep['seed']}  "
             f"({rep['seconds']:.0f} s)",
             f"Dice  consensus {m['dice_consensus']:.4f}  mean-mask {m['dice_mean_mask']:.4f}  "
             f"per-hypothesis {m['dice_per_hypothesis']:.4f}",
             f"IoU   consensus {m['iou_consensus']:.4f}  mean-mask {m['iou_mean_mask']:.4f}  "
             f"per-hypothesis {m['iou_per_hypothesis']:.4f}"]
    if "ged" in m:
        lines.append(f"GED {m['ged']:.4f}  HM-IoU {m['hm_iou']:.4f}")
    if rep.get("ece") is not None:
        lines.append(f"ECE (pixels, mean probability vs reference) {rep['ece']:.4f}")
    for w in rep.get("input_warnings", []):
        lines.append(f"WARNING: {w}")
    if "majority_marked" in rep:
        mm = rep["majority_marked"]
        lines.append(f"slices a majority of annotators marked ({mm['n_images']}): Dice consensus "
                     f"{mm['metrics']['dice_consensus']:.4f}  IoU consensus {mm['metrics']['iou_consensus']:.4f}")
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    return json.dumps(rep, indent=1)
