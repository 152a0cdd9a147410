"""The sampling contract: what a run asks for and the noise schedule it runs on.

``SampleOptions`` is one run's settings, checked once per call; ``Schedule`` is a plan's noise
schedule, built once per plan. ``Schedule.ddim(steps)`` gives every step's timestep, alphas and
noise stream from the native code (``msld_ddim_coeffs_for``), so the backends, the torch
samplers and the tests all read the one rule the native loop runs.
"""
from __future__ import annotations

import numbers
import secrets
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InputError
from .plan import SPACINGS
from .views import check_views

MAX_SEED = 2**64 - 1
# Solvers a run may ask for (SampleOptions.solver); each backend runs every one listed here.
SOLVERS = ("ddim",)


@dataclass(frozen=True)
class SampleOptions:
    """One run's sampling settings, checked against the plan (see ``SampleOptions.resolve``)."""

    k: int
    steps: int
    seed: int
    eta: float = 0.0
    threshold: float = 0.5
    views: int = 1
    solver: str = "ddim"

    @classmethod
    def resolve(cls, defaults: dict, num_train_timesteps: int, input_size: tuple[int, int], k=None, steps=None,
                seed=None, eta: float = 0.0, threshold=None, views=None,
                solver: str = "ddim") -> "SampleOptions":
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
        if solver not in SOLVERS:
            raise InputError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed must be an integer from 0 to 2**64-1, got {seed!r}")
        return cls(k=int(k), steps=int(steps), seed=int(seed), eta=float(eta), threshold=float(threshold),
                   views=views, solver=solver)


class DdimStep(NamedTuple):
    """One DDIM step's scalars (``msld_ddim_coeffs``) and the Philox stream of its eta noise."""

    index: int
    timestep: int
    prev_timestep: int   # t - T // steps; negative: alpha_prev is 1
    alpha_t: float
    alpha_prev: float
    noise_stream: int    # index + 1 (stream 0 is the initial latents)


@dataclass(frozen=True, eq=False)
class StepTable:
    """Every step of one DDIM run, step 0 (noisiest) first, exactly as the native loop uses them."""

    timesteps: np.ndarray       # int32 (steps,), descending
    prev_timesteps: np.ndarray  # int32 (steps,)
    alpha_t: np.ndarray         # float64 (steps,): float32 alphas as doubles
    alpha_prev: np.ndarray      # float64 (steps,)

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, i: int) -> DdimStep:
        i = range(len(self))[i]
        return DdimStep(i, int(self.timesteps[i]), int(self.prev_timesteps[i]), float(self.alpha_t[i]),
                        float(self.alpha_prev[i]), i + 1)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    steps = __iter__

    @property
    def noise_streams(self) -> np.ndarray:
        """Philox stream of each step's eta noise: i + 1."""
        return np.arange(1, len(self) + 1)

    def key(self) -> tuple:
        """A hashable identity of the table (cache keys)."""
        return (self.timesteps.tobytes(), self.alpha_t.tobytes(), self.alpha_prev.tobytes())


@dataclass(frozen=True, eq=False)
class Schedule:
    """A plan's noise schedule (manifest ``schedule``), built once per plan.

    ``alphas_cumprod`` float32 (T,); ``spacing`` one of ``plan.SPACINGS``; ``clip``: x0 clipping
    range (0: none)."""

    alphas_cumprod: np.ndarray
    spacing: str = "trailing"
    prediction: str = "epsilon"
    clip: float = 0.0

    def __post_init__(self):
        ac = np.array(self.alphas_cumprod, dtype=np.float32, order="C")
        ac.setflags(write=False)
        if ac.ndim != 1 or ac.size < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {ac.shape}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {self.spacing!r}")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "clip", float(self.clip))

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Schedule":
        s = manifest["schedule"]
        return cls(s["alphas_cumprod"], s["spacing"], s.get("prediction", "epsilon"),
                   float(s.get("clip_sample", 0.0)))

    @classmethod
    def from_plan(cls, plan) -> "Schedule":
        return cls.from_manifest(plan.manifest)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def ddim(self, steps: int) -> StepTable:
        """The DDIM steps of a ``steps``-step run, computed by the native code."""
        from . import _native
        if not hasattr(_native, "ddim_coefficients"):
            raise RuntimeError("msld_sdk._native predates Schedule (no ddim_coefficients): rebuild the extension")
        ts, prev, at, ap = _native.ddim_coefficients(self.alphas_cumprod, int(steps), self.spacing)
        return StepTable(np.asarray(ts, np.int32), np.asarray(prev, np.int32), np.asarray(at, np.float64),
                         np.asarray(ap, np.float64))
