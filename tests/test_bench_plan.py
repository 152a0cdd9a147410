"""Benchmark plans of the reference architecture from a configuration alone (random weights), and
`msld bench` on them: baselines, int8 with consensus agreement, peak RSS per k (issue #13).

The plans here are narrowed (base 32 channels) so that the tests take seconds; the published widths
are checked by parameter count only (building the modules, not exporting them)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from msld_sdk.cli import main  # noqa: E402
from msld_sdk.plan import Plan  # noqa: E402

# lidc_bench_plan (conftest.py): the LIDC family narrowed to base 32 channels, weights seed 7


def test_published_widths_have_the_papers_parameter_counts():
    from msld_export.reference.bench_plan import family_spec, parse_reference_config, reference_config
    from msld_export.reference.model import Denoiser
    for family, millions in (("lidc", 72.48), ("cvc", 82.63)):
        o = parse_reference_config(reference_config(family_spec(family)))
        n = sum(p.numel() for p in Denoiser(**o["denoiser"]).parameters())
        assert n / 1e6 == pytest.approx(millions, abs=0.01), family


def test_families_follow_the_reference_experiments():
    from msld_export.reference.bench_plan import family_spec, parse_reference_config, reference_config
    lidc = parse_reference_config(reference_config(family_spec("lidc")))
    cvc = parse_reference_config(reference_config(family_spec("cvc")))
    assert (lidc["image_size"], lidc["image_channels"], lidc["latent"]) == (128, 1, [1, 32, 32])
    assert (lidc["denoiser"]["channel_multipliers"], lidc["denoiser"]["attention_levels"],
            lidc["denoiser"]["n_layer_blocks"], lidc["denoiser"]["n_attention_heads"]) == ([1, 2, 4, 4], [1, 2], 1, 4)
    assert (cvc["image_size"], cvc["image_channels"], cvc["latent"]) == (256, 3, [1, 64, 64])
    assert (cvc["denoiser"]["channel_multipliers"], cvc["denoiser"]["attention_levels"],
            cvc["denoiser"]["n_layer_blocks"], cvc["denoiser"]["n_attention_heads"]) == ([1, 2, 3, 4], [1], 2, 1)
    assert cvc["denoiser"]["base_channels"] == lidc["denoiser"]["base_channels"] == 128
    assert cvc["embedder"]["base_channels"] == 64 and cvc["embedder"]["z_channels"] == 3


def test_bench_plan_is_a_valid_plan_of_the_family(lidc_bench_plan):
    from msld_export.sampling.baselines import ReferenceTorch, torch_model_for_plan
    plan = Plan.open(lidc_bench_plan)   # checks every blob's sha256
    m = plan.manifest
    assert m["model"]["name"] == "medseglatdiff-reference"
    assert m["model"]["denoiser"]["base_channels"] == 32
    assert m["model"]["denoiser"]["channel_multipliers"] == [1, 2, 4, 4]
    assert m["model"]["denoiser"]["attention_levels"] == [1, 2]
    assert m["schedule"]["spacing"] == "linspace_trunc" and m["schedule"]["clip_sample"] == 1.0
    prov = m["provenance"]
    assert prov["random_weights"] is True and prov["random_seed"] == 7 and prov["trained"] is False
    assert prov["family"] == "lidc" and prov["widths"].startswith("narrowed")
    # the seed alone rebuilds the PyTorch modules whose weights the graphs hold (verified inside)
    assert isinstance(torch_model_for_plan(plan), ReferenceTorch)


def test_bench_with_baselines_int8_and_memory_on_a_reference_plan(lidc_bench_plan, tmp_path, capsys):
    from msld_export.plan_writing.quantize_int8 import main as quantize
    path = tmp_path / "p.plan"
    shutil.copy(lidc_bench_plan, path)
    assert quantize([str(path), "--kind", "random", "--images", "2", "--steps", "3"]) == 0
    assert Plan.open(path).manifest["int8"]["calibration"]["kind"] == "random"
    img = tmp_path / "img.npy"
    np.save(img, np.random.default_rng(0).random((128, 128), dtype=np.float32))
    out = tmp_path / "bench.json"
    # the acceptance command's shape (int8, dpmpp2m): the baselines are still checked against the
    # SDK in fp32 with DDIM; the reference default at 4 steps instead of 50 (an override, reported)
    assert main(["bench", "--plan", str(path), "--image", str(img), "--k", "2", "--steps", "3", "--repeats", "1",
                 "--solver", "dpmpp2m", "--precision", "int8", "--reference-default-steps", "4",
                 "--baseline-repeats", "2", "--int8-repeats", "2", "--threads", "1", "--baselines",
                 "--rss-k", "1", "3", "-q", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["baselines_checked_same_result"] is True
    assert r["baselines_checked_against"] == {"precision": "fp32", "solver": "ddim", "steps": 3, "seed": 0,
                                              "backend": "onnxruntime"}
    for key in ("sdk_ms", "torch_eager_per_hypothesis_ms", "ort_per_hypothesis_ms"):
        assert r[key] > 0, key
    rd = r["reference_default"]
    assert rd["measured"] is True and rd["checked_same_result"] is True
    assert (rd["solver"], rd["steps"], rd["eta"], rd["k"], rd["hypotheses_per_call"]) == ("ddim", 4, 0.0, 2, 1)
    assert rd["steps_overridden"] is True and rd["checked_against"]["steps"] == 4
    assert rd["sdk_settings"] == {"k": 2, "steps": 3, "solver": "dpmpp2m", "precision": "int8"}
    assert len(rd["all_ms"]) == len(rd["sdk_interleaved_all_ms"]) == 2 == rd["repeats"]
    assert r["speedup_vs_reference_default"] == pytest.approx(rd["median_ms"] / rd["sdk_interleaved_ms"])
    ag = r["int8_run"]["int8_vs_fp32"]
    assert 0.0 <= ag["consensus_pixel_agreement"] <= 1.0 and ag["k"] == 2
    assert r["int8_run"]["speedup"] > 0 and r["int8_denoiser"]["repeats"] == 2
    rss = {x["k"]: x["peak_rss_mb"] for x in r["peak_rss_by_k"]}
    assert set(rss) == {1, 3} and rss[3] >= rss[1] > 0
    printed = capsys.readouterr().out
    assert "consensus masks agree on" in printed
    assert "reference default (DDIM 4 steps (overridden; the reference's default is 50)" in printed
