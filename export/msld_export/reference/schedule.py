"""The reference implementation's beta schedules (its ``make_beta_schedule``: base, linear,
scaled_linear, cosine) in float32, as its sampler builds ``alphas_bar`` from them: what the
trainer of the reference architecture uses and what the importer checks a config against."""
from __future__ import annotations

import math

import torch


def make_betas(n: int, schedule: str, start: float, end: float) -> torch.Tensor:
    """n betas of the named rule; ValueError for another name."""
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if schedule == "base":
        return torch.tensor([start + t / n * (end - start) for t in range(n)], dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2
    if schedule == "cosine":
        s = 0.008
        f = [math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2 for t in range(n + 1)]
        return torch.tensor([min(1 - f[t + 1] / f[t], 0.999) for t in range(n)], dtype=torch.float32)
    raise ValueError(f"beta_schedule {schedule!r} is not one of the reference's rules")
