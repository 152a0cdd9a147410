"""The optional int8 denoiser: made by export.quantize_int8, chosen with precision="int8"."""
import json
import logging
import shutil

import numpy as np
import pytest

from msld_sdk import BackendUnavailableError, PrecisionUnavailableError, Segmenter
from msld_sdk.cli import main
from msld_sdk.plan import Plan


@pytest.fixture(scope="module")
def int8_plan(tiny_plan, tmp_path_factory):
    from export.quantize_int8 import add_int8_denoiser
    p = tmp_path_factory.mktemp("int8") / "tiny_int8.plan"
    shutil.copy(tiny_plan, p)
    rng = np.random.default_rng(0)
    add_int8_denoiser(p, [rng.random((32, 32), dtype=np.float32) for _ in range(6)], {"kind": "random"})
    return p


def test_int8_plan_keeps_fp32_results_and_records_how_it_was_made(tiny_plan, int8_plan, rng):
    img = rng.random((40, 30), dtype=np.float32)
    before = Segmenter(tiny_plan).run(img, k=3, steps=4, seed=5)
    after = Segmenter(int8_plan).run(img, k=3, steps=4, seed=5)
    np.testing.assert_array_equal(before.probs, after.probs)          # fp32 stays the default, untouched
    plan = Plan.open(int8_plan)
    e = plan.manifest["int8"]
    assert e["denoiser"] in plan.blob_names() and e["calibration"]["feeds"] == plan.defaults["steps"]  # one batch
    assert 0.0 < e["eps_max_rel_err_on_calibration"] < 10  # random tiny weights quantize badly; real plans: README
    assert plan.blob(e["denoiser"]) != plan.blob("denoiser")


def test_int8_quantizes_convolutions_but_keeps_the_output_convolution_fp32(int8_plan):
    import onnx
    plan = Plan.open(int8_plan)
    g = onnx.load_from_string(plan.blob(plan.manifest["int8"]["denoiser"])).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    weight_source = [made_by.get(n.input[1], "initializer") for n in g.node if n.op_type == "Conv"]
    assert weight_source[-1] == "initializer"                                   # the output conv: fp32 weights
    assert weight_source[:-1] and set(weight_source[:-1]) == {"DequantizeLinear"}  # every other conv: int8


def test_int8_runs_close_to_fp32(int8_plan, rng, caplog):
    img = rng.random((32, 32), dtype=np.float32)
    ref = Segmenter(int8_plan).run(img, k=4, steps=6, seed=1)
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        seg = Segmenter(int8_plan, precision="int8")
    assert "int8 denoiser" in caplog.text and "TensorRT not considered" in caplog.text
    assert seg.backend.precision == "int8" and "precision='int8'" in repr(seg)
    q = seg.run(img, k=4, steps=6, seed=1)
    assert q.probs.shape == ref.probs.shape
    diff = np.abs(q.probs - ref.probs)
    assert diff.max() > 0                     # it really ran another graph ...
    assert diff.mean() < 0.02                 # ... that stays close to fp32


def test_int8_errors_name_the_fix(tiny_plan, int8_plan):
    with pytest.raises(PrecisionUnavailableError, match="export.quantize_int8"):
        Segmenter(tiny_plan, precision="int8")
    with pytest.raises(PrecisionUnavailableError, match="precision must be one of"):
        Segmenter(int8_plan, precision="fp16")
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime only"):
        Segmenter(int8_plan, backend="tensorrt", precision="int8")


def test_bench_command_reports_int8_denoiser(int8_plan, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--plan", str(int8_plan), "--k", "2", "--steps", "2", "--repeats", "2", "-q",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["k"] == 2 and r["steps"] == 2 and r["sdk_ms"] > 0 and 0 <= r["overhead_fraction"] < 1
    assert r["rows"][0]["stages_ms"]["denoise_ms"] > 0
    q = r["int8_denoiser"]
    assert q["batch"] == 2 and q["fp32_ms"] > 0 and q["int8_ms"] > 0 and q["eps_max_abs_diff"] > 0
    assert "int8" in capsys.readouterr().out
    assert main(["segment", str(tmp_path / "none.png"), "--plan", str(int8_plan), "--precision", "int8"]) == 1
