"""The sampling contract: what a run asks for and the noise schedule it runs on.

``SampleOptions`` is one run's settings, checked once per call; ``Schedule`` is a plan's noise
schedule, built once per plan. ``Schedule.ddim(steps)`` gives every step's timestep, alphas and
noise stream from the native code (``msld_ddim_coeffs_for``), ``Schedule.dpmpp2m(steps)`` every
DPM-Solver++(2M) step's coefficients (``msld_dpmpp2m_coeffs_for``), so the backends, the torch
samplers and the tests all read the one rule the native loop runs.
"""
from __future__ import annotations

import numbers
import secrets
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InputError
from .plan import SOLVERS, SPACINGS
from .timestep_grids import check_grid
from .views import check_views

MAX_SEED = 2**64 - 1
# SOLVERS (from plan.py): what a run may ask for (SampleOptions.solver); every backend runs each.
# "dpmpp2m": DPM-Solver++(2M), deterministic (eta 0 only).


def check_seed(seed) -> int:
    """A seed as the noise keys take it: an integer from 0 to MAX_SEED, else ``InputError``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be an integer from 0 to 2**64-1, got {seed!r}")
    return int(seed)


def default_eta(defaults: dict, solver: str | None = None) -> float:
    """A run's eta when none is given: the plan's ``defaults.eta`` for DDIM, 0 for dpmpp2m (which
    is deterministic by definition). ``solver`` None: the plan's default solver."""
    solver = defaults.get("solver", "ddim") if solver is None else solver
    return float(defaults.get("eta", 0.0)) if solver == "ddim" else 0.0


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
    timesteps: tuple[int, ...] | None = None   # dpmpp2m's grid (msld_sdk.timestep_grids); None: the spacing's

    @classmethod
    def resolve(cls, defaults: dict, num_train_timesteps: int, input_size: tuple[int, int], k=None, steps=None,
                seed=None, eta: float | None = None, threshold=None, views=None,
                solver=None, timesteps=None) -> "SampleOptions":
        """Fill what is None from the plan's ``defaults``, draw a seed if none, and check every
        value (``InputError`` naming the value and the allowed range). ``eta`` None: the plan's
        ``defaults.eta`` for DDIM, 0 for dpmpp2m.

        ``timesteps``: a DPM-Solver++(2M) grid (its length is the step count). Without one (None),
        the plan's ``defaults.timesteps`` (a grid ``msld tune`` chose) applies when the run is
        dpmpp2m at that grid's step count; else, or with ``"spacing"``, the plan's spacing rule."""
        d = defaults
        views = check_views(d.get("views", 1) if views is None else views, tuple(input_size))
        k = d["k"] if k is None else k
        use_plan_grid = timesteps is None
        if isinstance(timesteps, str) and timesteps == "spacing":
            timesteps = None
        if timesteps is not None:
            timesteps = check_grid(timesteps, num_train_timesteps)
            if steps is not None and steps != len(timesteps):
                raise InputError(f"steps={steps!r} but timesteps lists {len(timesteps)}: give one or the other")
            steps = len(timesteps)
        steps = d["steps"] if steps is None else steps
        threshold = d.get("threshold", 0.5) if threshold is None else threshold
        solver_from_plan = solver is None
        solver = d.get("solver", "ddim") if solver is None else solver
        if eta is None:
            eta = default_eta(d, solver)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d["max_k"]:
            raise InputError(f"k must be an integer from 1 to {d['max_k']} (this plan's limit), got {k!r}")
        T = num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise InputError(f"steps must be an integer from 1 to {T}, got {steps!r}")
        if isinstance(eta, bool) or not (isinstance(eta, numbers.Real) and 0.0 <= eta <= 1.0):
            raise InputError(f"eta must be a number in [0, 1], got {eta!r}")
        if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and 0.0 <= threshold < 1.0):
            raise InputError(f"threshold must be in [0, 1), got {threshold!r}")
        if not isinstance(solver, str) or solver not in SOLVERS:
            raise InputError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver == "dpmpp2m" and eta != 0.0:
            given = "this plan's default solver is" if solver_from_plan else "solver"
            raise InputError(f"{given} 'dpmpp2m', which is deterministic and runs with eta 0 only, got eta={eta!r}: "
                             f"use eta 0, or ask for DDIM with eta > 0 (solver='ddim' / --solver ddim, and "
                             f"steps: DDIM needs more than dpmpp2m, e.g. 20)")
        if timesteps is not None and solver != "dpmpp2m":
            given = "this plan's default solver is" if solver_from_plan else "solver"
            raise InputError(f"timesteps (a grid) are for solver 'dpmpp2m'; {given} {solver!r}: "
                             f"add solver='dpmpp2m' / --solver dpmpp2m, or leave the timesteps out")
        if use_plan_grid and solver == "dpmpp2m" and d.get("timesteps") is not None \
                and d.get("solver") == "dpmpp2m" and len(d["timesteps"]) == steps:
            timesteps = check_grid(d["timesteps"], T, what="the plan's defaults.timesteps")
        if seed is None:
            seed = secrets.randbits(63)
        seed = check_seed(seed)
        return cls(k=int(k), steps=int(steps), seed=int(seed), eta=float(eta), threshold=float(threshold),
                   views=views, solver=solver, timesteps=timesteps)


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


class Dpm2mStep(NamedTuple):
    """One DPM-Solver++(2M) step's scalars (``msld_dpmpp2m_coeffs``)."""

    index: int
    timestep: int
    next_timestep: int   # -1 at the last step (sigma 0)
    order: int           # 1 or 2
    alpha_t: float
    x_coef: float
    x0_coef: float
    x0_prev_coef: float


@dataclass(frozen=True, eq=False)
class Dpm2mTable:
    """Every step of one DPM-Solver++(2M) run, step 0 first, exactly as the native loop uses them:
    x0 = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t) (clipped as the plan says), then
    x_next = x_coef x + x0_coef x0 (+ x0_prev_coef x0_prev at order 2)."""

    timesteps: np.ndarray       # int32 (steps,), descending
    next_timesteps: np.ndarray  # int32 (steps,)
    order: np.ndarray           # int32 (steps,)
    alpha_t: np.ndarray         # float64 (steps,): float32 alphas as doubles
    x_coef: np.ndarray          # float64 (steps,)
    x0_coef: np.ndarray
    x0_prev_coef: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, i: int) -> Dpm2mStep:
        i = range(len(self))[i]
        return Dpm2mStep(i, int(self.timesteps[i]), int(self.next_timesteps[i]), int(self.order[i]),
                         float(self.alpha_t[i]), float(self.x_coef[i]), float(self.x0_coef[i]),
                         float(self.x0_prev_coef[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def key(self) -> tuple:
        """A hashable identity of the table (cache keys)."""
        return ("dpmpp2m", self.timesteps.tobytes(), self.alpha_t.tobytes(), self.x_coef.tobytes(),
                self.x0_coef.tobytes(), self.x0_prev_coef.tobytes())


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

    def dpmpp2m(self, steps: int, timesteps=None) -> Dpm2mTable:
        """The DPM-Solver++(2M) steps of a ``steps``-step run, computed by the native code, on the
        spacing rule's timesteps or on the grid ``timesteps`` (``steps`` long)."""
        from . import _native
        if not hasattr(_native, "dpmpp2m_coefficients"):
            raise RuntimeError("msld_sdk._native predates DPM-Solver++ (no dpmpp2m_coefficients): rebuild the extension")
        grid = None if timesteps is None else np.asarray(timesteps, np.int32)
        ts, nxt, order, at, xc, x0c, x0pc = _native.dpmpp2m_coefficients(self.alphas_cumprod, int(steps), self.spacing,
                                                                          grid)
        f = np.float64
        return Dpm2mTable(np.asarray(ts, np.int32), np.asarray(nxt, np.int32), np.asarray(order, np.int32),
                          np.asarray(at, f), np.asarray(xc, f), np.asarray(x0c, f), np.asarray(x0pc, f))

    def table(self, solver: str, steps: int, timesteps=None):
        """The step table of ``solver`` (one of ``SOLVERS``): ``ddim`` or ``dpmpp2m`` (on the grid
        ``timesteps`` when given: ``SampleOptions.timesteps``)."""
        if solver == "ddim":
            if timesteps is not None:
                raise ValueError("a timestep grid is for solver 'dpmpp2m', not 'ddim'")
            return self.ddim(steps)
        if solver == "dpmpp2m":
            return self.dpmpp2m(steps, timesteps)
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
