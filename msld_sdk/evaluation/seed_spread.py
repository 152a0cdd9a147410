"""Comparing sampler settings over seeds: the rule that ``msld tune`` and the protocol summary
(``benchmarks/eval_summary.py``) both apply.

A setting's figures over seeds are ``{seed: {metric: value}}``. Per metric: the mean and the
sample standard deviation over seeds, and the differences to a reference setting paired by
seed (same seed, so the same per-image noise). THE rule: a setting holds when, for every
watched metric, |mean of the setting - mean of the reference| <= the reference's seed sd, both
over the seeds the two share; fewer than two shared seeds have no spread and are refused. Whether
lower or higher is better does not matter to the rule. The reference holds against itself.
"""
from __future__ import annotations

import math
import statistics as st
from dataclasses import dataclass

from ..errors import UsageError

RULE = ("a setting holds when, for every watched metric, |its mean over seeds - the reference's mean| "
        "<= the reference's seed sd (sample sd over the same seeds)")


@dataclass(frozen=True)
class Comparison:
    """One metric of one setting against the reference, over ``seeds``."""
    metric: str
    seeds: tuple
    mean: float
    sd: float
    ref_mean: float
    ref_sd: float
    paired: tuple        # setting minus reference, seed by seed

    @property
    def diff(self) -> float:
        return self.mean - self.ref_mean

    @property
    def within(self) -> bool:
        """The rule for this metric (False when a figure is not finite)."""
        return bool(abs(self.diff) <= self.ref_sd)   # NaN compares False


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the sd is NaN for fewer than two values, both
    are NaN when a value is not finite."""
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return st.mean(values), (st.stdev(values) if len(values) > 1 else math.nan)


def shared_seeds(setting: dict, reference: dict, metric: str) -> list:
    """The seeds at which both have ``metric``, sorted."""
    return sorted(s for s in setting if s in reference and metric in setting[s] and metric in reference[s])


def compare(setting: dict, reference: dict, metric: str) -> Comparison:
    """``metric`` of ``setting`` against ``reference`` (each ``{seed: {metric: value}}``) over the
    seeds they share; ``UsageError`` with fewer than two (no seed spread to compare with)."""
    seeds = shared_seeds(setting, reference, metric)
    if len(seeds) < 2:
        raise UsageError(f"{metric}: {len(seeds)} seed(s) shared with the reference setting; the seed spread "
                         "needs at least two: evaluate both at two or more seeds (e.g. --seeds 0 1 2)")
    a = [float(setting[s][metric]) for s in seeds]
    r = [float(reference[s][metric]) for s in seeds]
    (m, sd), (rm, rsd) = mean_sd(a), mean_sd(r)
    return Comparison(metric, tuple(seeds), m, sd, rm, rsd, tuple(x - y for x, y in zip(a, r)))


def compare_all(setting: dict, reference: dict, metrics) -> dict[str, Comparison]:
    return {m: compare(setting, reference, m) for m in metrics}


def holds(comparisons: dict[str, Comparison]) -> bool:
    """THE rule over the watched metrics (see the module docstring)."""
    return bool(comparisons) and all(c.within for c in comparisons.values())
