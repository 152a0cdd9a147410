"""The msld command and the export step (ONNX graphs checked, plan written)."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import DATA
from msld_sdk.cli import main
from msld_sdk.plan import Plan

SAMPLE = "msld_sdk/samples/lidc_0974_n0_s2/image.png"


def test_exported_graphs_are_valid_onnx_with_dynamic_batch(tiny_plan):
    p = Plan.open(tiny_plan)
    for part in ("encoder", "denoiser", "decoder"):
        model = onnx.load_from_string(p.blob(part))
        onnx.checker.check_model(model, full_check=True)
        for inp in model.graph.input:
            dim0 = inp.type.tensor_type.shape.dim[0]
            assert dim0.dim_param and not dim0.dim_value, f"{part}.{inp.name} batch axis is not dynamic"
    errs = p.manifest["provenance"]["onnx_vs_torch_max_rel_err"]
    assert all(0 <= e < 1e-4 for e in errs.values()), errs


def test_segment_writes_pngs(tmp_path, tiny_plan):
    out = tmp_path / "out"
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)).save(img)
    assert main(["segment", str(img), "--plan", str(tiny_plan), "-k", "3", "--steps", "4", "--seed", "9",
                 "-o", str(out), "-q"]) == 0
    names = sorted(f.name for f in out.iterdir())
    assert names == ["confidence.png", "consensus.png", "mask_00.png", "mask_01.png", "mask_02.png",
                     "mean.png", "overlay.png"]
    assert Image.open(out / "mask_00.png").size == (50, 40)
    assert Image.open(out / "confidence.png").mode == "RGB"


def test_segment_default_plan_on_shipped_sample(tmp_path):
    r = subprocess.run([sys.executable, "-m", "msld_sdk.cli", "segment", SAMPLE, "-o", str(tmp_path), "-k", "2",
                        "--steps", "2", "--seed", "1", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "k=2 steps=2 views=1 seed=1" in r.stdout
    assert (tmp_path / "overlay.png").exists()


def test_info_and_errors(capsys, tmp_path, tiny_plan):
    assert main(["info", str(tiny_plan)]) == 0
    assert "format: msld-plan v1" in capsys.readouterr().out
    bad = tmp_path / "bad.plan"
    bad.write_text("hello")
    assert main(["info", str(bad)]) == 1
    assert "not a plan file" in capsys.readouterr().err


def test_help_on_each_command():
    for cmd in (["--help"], ["segment", "--help"], ["info", "--help"], ["export", "--help"]):
        r = subprocess.run([sys.executable, "-m", "msld_sdk.cli", *cmd], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, (cmd, r.stderr)


def test_export_command_random(tmp_path):
    out = tmp_path / "r.plan"
    cfg = tmp_path / "c.json"
    import json
    from msld_export.model.config import tiny_config
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    assert main(["export", "--random", "--config", str(cfg), str(out)]) == 0
    assert Plan.open(out).manifest["provenance"]["trained"] is False


def test_runtime_does_not_import_torch():
    code = ("import sys, numpy as np; from msld_sdk import Segmenter; "
            "Segmenter().run(np.zeros((16, 16), np.float32), k=1, steps=1, seed=0); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_segment_several_images_with_the_same_file_name(tmp_path, tiny_plan):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((20, 20), 100 if sub == "a" else 200, np.uint8)).save(tmp_path / sub / "image.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a" / "image.png"), str(tmp_path / "b" / "image.png"), "--plan",
                 str(tiny_plan), "-k", "1", "--steps", "1", "--seed", "0", "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_image", "b_image"]


def test_segment_several_images_do_not_share_noise(tmp_path, tiny_plan, capsys):
    """One --seed, several images: image i is sampled with image_seed(seed, i) (as --ray and
    msld eval); the same image twice gets two different draws, each reproducible alone."""
    from msld_sdk import Segmenter
    from msld_sdk.evaluation.evaluate import image_seed

    img = tmp_path / "same.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 24), dtype=np.uint8)).save(img)
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / "same.png"
    twin.write_bytes(img.read_bytes())
    out = tmp_path / "out"
    assert main(["segment", str(img), str(twin), "--plan", str(tiny_plan), "-k", "3", "--steps", "3",
                 "--seed", "5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"seed={image_seed(5, 0)}" in text and f"seed={image_seed(5, 1)}" in text
    first, second = (np.asarray(Image.open(out / d / "mean.png")) for d in (f"{tmp_path.name}_same", "b_same"))
    assert not np.array_equal(first, second)
    alone = Segmenter(tiny_plan).run(str(twin), k=3, steps=3, seed=image_seed(5, 1))
    assert np.array_equal(second, (alone.mean * 255 + 0.5).astype(np.uint8))   # reproducible from its seed
    one = tmp_path / "one"
    assert main(["segment", str(img), "--plan", str(tiny_plan), "-k", "3", "--steps", "3", "--seed", "5",
                 "-o", str(one), "-q"]) == 0
    assert "seed=5" in capsys.readouterr().out                   # one image: the seed itself


def test_set_defaults_keeps_the_graphs(tiny_plan, tmp_path):
    """export/msld_export/plan_writing/set_defaults.py: a new default number of steps, same graphs, the change recorded."""
    import shutil

    from msld_export.plan_writing.set_defaults import set_defaults
    from msld_sdk import Segmenter
    from msld_sdk.plan import Plan

    p = tmp_path / "p.plan"
    shutil.copy(tiny_plan, p)
    before = Plan.open(p).manifest
    set_defaults(p, steps=3, why="test")
    after = Plan.open(p).manifest
    assert after["defaults"]["steps"] == after["model"]["default_steps"] == 3
    assert after["blobs"] == before["blobs"]
    assert after["provenance"]["defaults_changed"]["from"]["steps"] == before["defaults"]["steps"]
    assert Segmenter(p).run(np.zeros((32, 32), np.float32), k=2, seed=0).steps == 3
    set_defaults(p, steps=2, why="second")   # a later change keeps the earlier record
    prov = Plan.open(p).manifest["provenance"]
    assert [r["why"] for r in prov["defaults_history"]] == ["test"] and prov["defaults_changed"]["to"]["steps"] == 2
    # the model's checksum (what msld eval records, eval_seeds.sh compares) ignores metadata ...
    assert Plan.open(p).graphs_sha256 == Plan.open(tiny_plan).graphs_sha256
    # ... and follows the graphs
    from msld_sdk.plan import add_blobs
    other = tmp_path / "other.plan"
    add_blobs(p, {"decoder": ("graphs/decoder.onnx", Plan.open(p).blob("encoder"))}, {}, out_path=other)
    assert Plan.open(other, verify=False).graphs_sha256 != Plan.open(p).graphs_sha256


def _without(monkeypatch, *modules):
    """Make importlib.util.find_spec (and imports) see ``modules`` as not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


@pytest.mark.parametrize("argv", [["export", "--random", "x.plan"], ["bench", "--baselines", "--k", "1"]])
def test_torch_side_command_without_the_extra_says_which_extra(monkeypatch, capsys, argv):
    _without(monkeypatch, "torch")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'msld_sdk[export]'" in err and argv[0] in err, err


def test_hm_iou_without_scipy_names_the_extra(monkeypatch):
    from msld_sdk.evaluation import metrics
    from msld_sdk.errors import MissingExtraError

    _without(monkeypatch, "scipy", "scipy.optimize")
    with pytest.raises(MissingExtraError, match=r"pip install 'msld_sdk\[eval\]'"):
        metrics.hungarian_matched_iou(np.ones((2, 4, 4), bool), np.ones((2, 4, 4), bool))


@pytest.mark.skipif(not (DATA / "lidc").is_dir(), reason=f"no LIDC data at {DATA}")
def test_eval_on_multi_annotator_data_without_scipy_stops_before_running(monkeypatch, capsys, tiny_plan):
    _without(monkeypatch, "scipy", "scipy.optimize")
    assert main(["eval", "--plan", str(tiny_plan), "--kind", "lidc", "--limit", "1", "--data", str(DATA), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'msld_sdk[eval]'" in err, err


def test_bench_of_a_colour_plan_converts_the_default_sample_once(tiny_rgb_plan, tmp_path, caplog, capsys):
    """The only shipped sample is a CT slice: a colour plan is timed on it converted to three channels
    once (recorded in the report), not with a greyscale warning on every timed run."""
    import json
    import logging
    out = tmp_path / "bench.json"
    with caplog.at_level(logging.WARNING):
        assert main(["bench", "--plan", str(tiny_rgb_plan), "--k", "1", "--steps", "1", "--repeats", "2",
                     "--threads", "1", "--json", str(out)]) == 0
    assert not [r for r in caplog.records if "greyscale image given" in r.getMessage()]
    r = json.loads(out.read_text())
    assert "3 channels" in r["image_note"] and r["image"].endswith("image.png")
    assert "note: no --image" in capsys.readouterr().err
    # a one-channel plan takes the sample as it is, and says nothing
    out1 = tmp_path / "bench1.json"
    assert main(["bench", "--plan", "lidc", "--k", "1", "--steps", "1", "--repeats", "1", "--threads", "1", "-q",
                 "--no-int8-run", "--json", str(out1)]) == 0
    assert json.loads(out1.read_text())["image_note"] is None
