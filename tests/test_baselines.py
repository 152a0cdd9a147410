"""The benchmark baselines compute what the SDK computes (timings are benchmarks/, not here)."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from msld_sdk import Segmenter  # noqa: E402
from msld_sdk.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def image01():
    return np.random.default_rng(4).random((32, 32), dtype=np.float32)  # the tiny plan's input size


def test_every_baseline_gives_the_sdk_probabilities(tiny_plan, image01):
    from msld_export.sampling.baselines import OrtPerHypothesis, torch_eager_per_hypothesis, torch_model_for_plan
    seg = Segmenter(tiny_plan, backend="onnxruntime", threads=1)
    assert tuple(seg.plan.image_size) == image01.shape
    k, steps = 3, 4
    sdk = seg.run(image01, k=k, steps=steps, seed=5).probs
    got = {
        "torch eager": torch_eager_per_hypothesis(torch_model_for_plan(seg.plan), seg.plan, image01, k, steps, 5),
        "ORT defaults": OrtPerHypothesis(seg.plan, 1)(image01, k, steps, 5),
        "ORT SDK settings": OrtPerHypothesis(seg.plan, 1, sdk_settings=True)(image01, k, steps, 5),
    }
    for name, probs in got.items():
        assert probs.shape == sdk.shape, name
        np.testing.assert_allclose(probs, sdk, atol=1e-4, err_msg=name)
    # and the hypotheses differ from each other (a baseline that reused one noise draw would not)
    assert np.abs(sdk[0] - sdk[1]).max() > 1e-3


def test_bench_baselines_json_has_the_tracked_keys(tiny_plan, image01, tmp_path, capsys):
    img = tmp_path / "img.npy"
    np.save(img, image01)
    out = tmp_path / "bench.json"
    assert main(["bench", "--plan", str(tiny_plan), "--image", str(img), "--k", "2", "--steps", "3",
                 "--repeats", "1", "--baseline-repeats", "1", "--threads", "1", "--baselines", "-q",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("sdk_ms", "torch_eager_per_hypothesis_ms", "ort_per_hypothesis_ms",
                "ort_per_hypothesis_sdk_settings_ms", "overhead_fraction"):
        assert r[key] > 0, key
    assert r["baselines_checked_same_result"] is True
    assert r["speedup_vs_ort_per_hypothesis"] == pytest.approx(r["ort_per_hypothesis_ms"] / r["sdk_ms"])
    # the reference's default loop is a baseline of reference-family plans only (tests/test_bench_plan.py)
    assert r["reference_default"]["measured"] is False and "speedup_vs_reference_default" not in r
    assert "reference default (DDIM 50 steps, one hypothesis at a time): applies only to reference-family plans" \
        in capsys.readouterr().out
