"""Own, imported and benchmark plans get their manifest from one builder
(``msld_export.plan_writing.manifest.build_manifest``), and what it builds is a manifest the
runtime accepts (``msld_sdk.plan.REQUIRED_KEYS`` and its value checks, through ``Plan.open``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("torch")

from msld_sdk.plan import GRAPH_PARTS, REQUIRED_KEYS, Plan, write_plan  # noqa: E402

# as tests/test_reference_import.py: ../shared/reference/lidc, or a case folder in MSLD_REFERENCE_FIXTURES
REFERENCE_CASES = [Path(__file__).parents[1].parent / "shared" / "reference" / "lidc"] + \
    [Path(p) for p in os.environ.get("MSLD_REFERENCE_FIXTURES", "").split(":") if p]
WRITTEN_BY_WRITE_PLAN = {"format", "format_version", "blobs"}


@pytest.fixture
def builder_calls(monkeypatch):
    """Every call of build_manifest, from each module that uses it."""
    from msld_export.plan_writing import export_plan, manifest
    from msld_export.reference import importer
    calls = []

    def spy(**kw):
        m = manifest.build_manifest(**kw)
        calls.append(m)
        return m

    for mod in (export_plan, importer):
        monkeypatch.setattr(mod, "build_manifest", spy)
    return calls


def _accepted(m: dict, tmp_path: Path) -> Plan:
    assert set(REQUIRED_KEYS) - WRITTEN_BY_WRITE_PLAN <= set(m)
    out = tmp_path / "m.plan"
    write_plan(out, m, {p: (f"graphs/{p}.onnx", p.encode()) for p in GRAPH_PARTS})
    return Plan.open(out)   # runs the runtime's manifest checks (_validate_manifest_values)


def test_own_plan_manifest_comes_from_the_builder(builder_calls, tmp_path):
    from msld_export.model.config import tiny_config
    from msld_export.plan_writing.export_plan import manifest_for
    m = manifest_for(tiny_config(), {"note": "test"})
    assert builder_calls == [m]
    plan = _accepted(m, tmp_path)
    assert plan.manifest["schedule"]["spacing"] == "trailing" and "ddim" not in plan.manifest["schedule"]
    assert plan.condition_shape == plan.latent_shape and plan.manifest["provenance"] == {"note": "test"}
    assert manifest_for(tiny_config(name="lidc-small"), {})["training_input"]["kind"] == "crop"


def test_bench_plan_manifest_comes_from_the_builder(builder_calls, tmp_path):
    from msld_export.reference.bench_plan import RandomReferenceModel
    m = RandomReferenceModel("lidc", 7, [32, 32, 32]).manifest({"random_seed": 7})
    assert builder_calls == [m]
    plan = _accepted(m, tmp_path)
    assert plan.manifest["model"]["weights"] == "random (seed 7)"
    assert plan.manifest["schedule"]["spacing"] == "linspace_trunc"
    assert plan.manifest["schedule"]["ddim"]["rule"].startswith("reference-")


def test_imported_plan_manifest_comes_from_the_builder(builder_calls, tmp_path):
    case = next((c for c in REFERENCE_CASES if (c / "last.ckpt").exists()), None)
    if case is None:
        pytest.skip("no reference fixture (../shared/reference/make_fixture.py, or MSLD_REFERENCE_FIXTURES)")
    from msld_export.reference.importer import ImportedModel
    im = ImportedModel(case / "last.ckpt", case / "config.yaml")
    m = im.manifest({"checkpoint": "last.ckpt"})
    assert builder_calls == [m]
    plan = _accepted(m, tmp_path)
    assert plan.manifest["model"]["weights"] == ("ema" if im.use_ema else "raw")
    assert plan.condition_shape == (im.opts["embedder"]["z_channels"], *im.opts["latent"][1:])
    assert len(plan.manifest["schedule"]["alphas_cumprod"]) == im.opts["n_train_steps"]


def test_builder_refuses_a_spacing_the_runtime_does_not_know():
    from msld_export.plan_writing.manifest import build_manifest
    with pytest.raises(ValueError, match="spacing"):
        build_manifest(model={}, num_train_timesteps=2, beta_schedule="linear", beta_start=0.1, beta_end=0.2,
                       alphas_cumprod=[0.9, 0.8], spacing="uniform", image_size=8, image_channels=1, mean=[0.5],
                       std=[0.5], latent_channels=1, latent_size=(2, 2), k=1, steps=1, max_k=1, provenance={})
