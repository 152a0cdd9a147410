"""The sampling contract: what a run asks for (``SampleOptions``), validated once per call.

``Segmenter`` packs its keyword arguments into one ``SampleOptions`` and passes that record
down; backends, ROI, volumes and Ray take it as it is. The noise schedule a plan carries
(``Schedule``) lives here too.
"""
from __future__ import annotations

import numbers
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .views import check_views

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SampleOptions:
    """One run's sampling settings, checked against the plan (see ``SampleOptions.resolve``)."""

    k: int
    steps: int
    seed: int
    eta: float = 0.0
    threshold: float = 0.5
    views: int = 1

    @classmethod
    def resolve(cls, defaults: dict, num_train_timesteps: int, input_size: tuple[int, int], k=None, steps=None,
                seed=None, eta: float = 0.0, threshold=None, views=None) -> "SampleOptions":
        """Fill what is None from the plan's ``defaults``, draw a seed if none, and check every
        value (``InputError`` naming the value and the allowed range)."""
        d = defaults
        views = check_views(d.get("views", 1) if views is None else views, tuple(input_size))
        k = d["k"] if k is None else k
        steps = d["steps"] if steps is None else steps
        threshold = d.get("threshold", 0.5) if threshold is None else threshold
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d["max_k"]:
            raise InputError(f"k must be an integer from 1 to {d['max_k']} (this plan's limit), got {k!r}")
        T = num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise InputError(f"steps must be an integer from 1 to {T}, got {steps!r}")
        if isinstance(eta, bool) or not (isinstance(eta, numbers.Real) and 0.0 <= eta <= 1.0):
            raise InputError(f"eta must be a number in [0, 1], got {eta!r}")
        if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and 0.0 <= threshold < 1.0):
            raise InputError(f"threshold must be in [0, 1), got {threshold!r}")
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed must be an integer from 0 to 2**64-1, got {seed!r}")
        return cls(k=int(k), steps=int(steps), seed=int(seed), eta=float(eta), threshold=float(threshold),
                   views=views)
