"""Timestep grids for DPM-Solver++(2M): which noise levels a few-step run visits.

The plans' spacing rules (leading, trailing, linspace_trunc) place the steps evenly in t. At
four or five steps where they go matters, so ``msld tune --grids`` searches a one-parameter
family and a plan may carry the grid it chose (``defaults.timesteps``):

    power grid, rho:  t_i = round(T ((steps - i) / steps) ** rho) - 1,   i = 0 .. steps-1

rho = 1 is the ``trailing`` rule exactly; rho > 1 moves the steps toward low noise (the last
step, which lands on sigma 0, then starts from a cleaner latent), rho < 1 toward high noise.
"""
from __future__ import annotations

import numbers

import numpy as np

from .errors import InputError


def power_grid(num_train_timesteps: int, steps: int, rho: float) -> tuple[int, ...]:
    """The power grid (module docstring), descending; ``InputError`` when two steps coincide."""
    T = int(num_train_timesteps)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0.0 < float(rho) <= 10.0:
        raise InputError(f"a power grid's rho must be a number in (0, 10], got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise InputError(f"steps must be an integer from 1 to {T}, got {steps!r}")
    frac = (np.arange(steps, 0, -1, dtype=np.float64) / steps) ** float(rho)
    grid = tuple(int(v) for v in np.maximum(np.round(T * frac).astype(np.int64) - 1, 0))
    return check_grid(grid, T, what=f"the power grid of {steps} steps with rho={rho}")


def check_grid(timesteps, num_train_timesteps: int, what: str = "timesteps") -> tuple[int, ...]:
    """``timesteps`` as a tuple of ints, checked: at least one, each in [0, T), strictly
    decreasing (each step must lower the noise). ``InputError`` naming the fault otherwise."""
    T = int(num_train_timesteps)
    if isinstance(timesteps, (str, bytes)):
        raise InputError(f"{what} must be a list of integers, got {timesteps!r}")
    try:
        values = list(timesteps)
    except TypeError:
        raise InputError(f"{what} must be a list of integers, got {timesteps!r}") from None
    if not values:
        raise InputError(f"{what} is empty: give at least one timestep")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < T:
            raise InputError(f"{what}: {v!r} is not an integer timestep from 0 to {T - 1}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise InputError(f"{what} must strictly decrease (noisiest first), got {values}")
    return tuple(int(v) for v in values)


def describe(timesteps) -> str:
    """``999,561,249,61``: how a grid is written on the command line and in reports."""
    return ",".join(str(int(t)) for t in timesteps)

