"""The one builder of a plan's manifest, for own, imported and benchmark plans.

``build_manifest`` takes what differs between them as arguments (model section, schedule
with its timestep spacing, optional DDIM rule and x0 clip, input, latent and optional
condition shape, defaults, provenance, optional training_input record) and returns the
dict that ``msld_sdk.plan.write_plan`` completes with format, version and blobs.
Callers: ``export_plan.manifest_for`` and ``reference.importer.ImportedModel.manifest``
(which ``reference.bench_plan.RandomReferenceModel`` inherits).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from msld_sdk.plan import SPACINGS

LAYOUT = "NCHW, values in [0,1] then (x - mean) / std"


def build_manifest(*, model: Mapping, num_train_timesteps: int, beta_schedule, beta_start, beta_end,
                   alphas_cumprod: Iterable, spacing: str, clip_sample: float = 0.0, ddim: Mapping | None = None,
                   image_size: int, image_channels: int, mean: Sequence, std: Sequence,
                   latent_channels: int, latent_size: Sequence[int], condition: Sequence[int] | None = None,
                   k: int, steps: int, max_k: int, eta: float = 0.0, threshold: float = 0.5,
                   provenance: Mapping, training_input: Mapping | None = None) -> dict:
    """A plan manifest (without "format", "format_version" and "blobs", which ``write_plan`` adds).

    ``alphas_cumprod``: the training schedule's cumulative alphas as float32 values (written as
    Python floats, exactly); ``spacing``: one of ``msld_sdk.plan.SPACINGS``; ``ddim``: a named
    sampler rule (imported plans), recorded as ``schedule.ddim``; ``latent_size``: (h, w);
    ``condition``: (channels, h, w) of the encoder's output when it differs from the latent's
    (imported plans); ``training_input``: the record of ``training.training_input``, if any.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} is not one of {SPACINGS}")
    schedule = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end,
        # float32 values as training used them; JSON keeps them exactly (float32 -> float64 repr)
        "alphas_cumprod": [float(a) for a in alphas_cumprod],
        "spacing": spacing,
        "prediction": "epsilon",
        "clip_sample": float(clip_sample),
    }
    if ddim is not None:
        schedule["ddim"] = dict(ddim)
    m = {
        "model": dict(model),
        "schedule": schedule,
        "input": {"size": [image_size, image_size], "channels": image_channels,
                  "mean": list(mean), "std": list(std),
                  "color": "grayscale" if image_channels == 1 else "rgb",
                  "layout": LAYOUT},
        "latent": {"channels": latent_channels, "size": list(latent_size)},
        "defaults": {"k": k, "steps": steps, "eta": eta, "threshold": threshold, "max_k": max_k},
        "engines": [],
        "provenance": provenance,
    }
    if condition is not None:
        c, h, w = condition
        m["condition"] = {"channels": c, "size": [h, w]}
    if training_input is not None:
        m["training_input"] = training_input
    return m
