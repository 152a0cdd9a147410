"""Shared fixtures: small exported plans made once per test session (no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    from msld_export.model.checkpoint import random_model
    from msld_export.model.config import tiny_config
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_plan(tiny_model, tmp_path_factory) -> Path:
    from msld_export.plan_writing.export_plan import export_plan
    out = tmp_path_factory.mktemp("plans") / "tiny.plan"
    export_plan(tiny_model, out, {"trained": False, "note": "test fixture"})
    return out


@pytest.fixture(scope="session")
def tiny_x0_model_and_plan(tmp_path_factory):
    """A tiny model whose denoiser predicts the clean latent (prediction_type "sample")."""
    from msld_export.model.checkpoint import random_model
    from msld_export.model.config import tiny_config
    from msld_export.plan_writing.export_plan import export_plan
    model = random_model(tiny_config(name="tiny-x0", prediction_type="sample"), seed=3)
    out = tmp_path_factory.mktemp("plans") / "tiny_x0.plan"
    export_plan(model, out, {"trained": False, "note": "test fixture"})
    return model, out


@pytest.fixture(scope="session")
def tiny_rgb_plan(tmp_path_factory) -> Path:
    from msld_export.model.checkpoint import random_model
    from msld_export.model.config import tiny_config
    from msld_export.plan_writing.export_plan import export_plan
    model = random_model(tiny_config(name="tiny-rgb", image_channels=3, image_mean=(0.5,) * 3,
                                     image_std=(0.25,) * 3), seed=1)
    out = tmp_path_factory.mktemp("plans") / "tiny_rgb.plan"
    export_plan(model, out, {"trained": False, "note": "test fixture"})
    return out


@pytest.fixture(scope="session")
def tiny_crop_plan(tiny_plan, tmp_path_factory) -> Path:
    """The tiny test plan, recorded as trained on 32 x 32 crops with per-crop min-max (like LIDC)."""
    import shutil

    from msld_export.training.training_input import TRAINING_INPUTS, set_training_input
    p = tmp_path_factory.mktemp("plans") / "tiny_crop.plan"
    shutil.copy(tiny_plan, p)
    set_training_input(p, "lidc", why="test fixture", record=dict(TRAINING_INPUTS["lidc"], crop_size=[32, 32]))
    return p


NARROW_BENCH = {"family": "lidc", "seed": 7, "base_channels": [32, 32, 32]}


@pytest.fixture(scope="session")
def lidc_bench_plan(tmp_path_factory) -> Path:
    """A benchmark plan of the reference architecture (LIDC family) narrowed to base 32 channels,
    random weights of seed 7 (``python -m msld_export.reference.bench_plan``); read-only: copy it
    before changing it."""
    from msld_export.reference.bench_plan import main as bench_plan
    out = tmp_path_factory.mktemp("bench_plan") / "lidc_narrow.plan"
    assert bench_plan([NARROW_BENCH["family"], "--out", str(out), "--seed", str(NARROW_BENCH["seed"]),
                       "--base-channels", *map(str, NARROW_BENCH["base_channels"])]) == 0
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
