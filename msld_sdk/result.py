"""What ``Segmenter.run`` returns for one image."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegmentationResult:
    masks: np.ndarray        # k x H x W bool: one plausible segmentation per hypothesis
    mean: np.ndarray         # H x W float32: mean foreground probability over the k hypotheses
    confidence: np.ndarray   # H x W float32 in [0, 1]: 1 where all k masks agree, 0 at a 50/50 split
    consensus: np.ndarray    # H x W bool: majority vote of the k masks
    probs: np.ndarray        # k x H x W float32: each hypothesis' foreground probability
    seed: int                # the seed that reproduces this result
    steps: int
    eta: float
    timings: dict = field(default_factory=dict)  # milliseconds per stage
    roi: tuple | None = None  # (x0, y0, x1, y1) kept when run with roi=...; zeros outside it
    views: int = 1            # hypothesis j was sampled from the image in view j % views (msld_sdk.views)
    solver: str = "ddim"      # the sampler that made it: "ddim" or "dpmpp2m" (msld_sdk.sampling.SOLVERS)
    timesteps: tuple | None = None  # dpmpp2m's timestep grid when one was given or tuned; None: the plan's spacing
    threshold: float = 0.5    # the probability above which a hypothesis' pixel is in its mask

    @property
    def k(self) -> int:
        return int(self.masks.shape[0])

    def __repr__(self) -> str:
        h, w = self.mean.shape
        t = self.timings.get("total_ms")
        tt = f", {t:.1f} ms" if t is not None else ""
        return f"SegmentationResult(k={self.k}, {h}x{w}, steps={self.steps}{'' if self.solver == 'ddim' else ' ' + self.solver}, seed={self.seed}{tt})"
