"""Issue #25 part 3: a bad input in a local batch is recorded (error.json, a summary at the end,
exit 1) and the other inputs are processed, as the Ray path does."""
import json

import numpy as np
from PIL import Image

from msld_sdk.cli.main import main

PNGS = ["confidence.png", "consensus.png", "mask_00.png", "mean.png", "overlay.png"]


def _png(path, value):
    Image.fromarray(np.full((24, 24), value, np.uint8)).save(path)
    return path


def test_a_bad_input_in_the_middle_does_not_stop_the_batch(tmp_path, tiny_plan, capsys):
    a, c = _png(tmp_path / "a.png", 50), _png(tmp_path / "c.png", 150)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert main(["segment", str(a), str(bad), str(tmp_path / "gone.png"), str(c), "--plan", str(tiny_plan),
                 "-k", "1", "--steps", "1", "--seed", "0", "-q", "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "gone"]
    for name in ("a", "c"):
        assert sorted(p.name for p in (out / name).iterdir()) == PNGS
    for name, path in (("b", bad), ("gone", tmp_path / "gone.png")):
        assert [p.name for p in (out / name).iterdir()] == ["error.json"]
        rec = json.loads((out / name / "error.json").read_text())
        assert rec["path"] == str(path) and rec["error"].startswith("InputError")
    assert "a.png: k=1" in captured.out and "c.png: k=1" in captured.out
    assert "2 of 4 inputs written to" in captured.err and "2 failed" in captured.err
    assert f"  {tmp_path / 'gone.png'}: InputError: image file not found" in captured.err
    assert "Traceback" not in captured.err


def test_a_batch_where_every_input_fails_keeps_the_earlier_output(tmp_path, tiny_plan, capsys):
    a = _png(tmp_path / "a.png", 50)
    out = tmp_path / "out"
    assert main(["segment", str(a), "--plan", str(tiny_plan), "-k", "1", "--steps", "1", "-q", "-o", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["segment", str(tmp_path / "x.png"), str(tmp_path / "y.png"), "--plan", str(tiny_plan), "-k", "1",
                 "--steps", "1", "-q", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "msld: error: all 2 inputs failed" in err and f"{out} left as it was" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_local_run_items_records_and_goes_on(tmp_path, tiny_plan):
    """The Ray path's in-process twin, for comparison: the same record, the same outcome."""
    from msld_sdk.clinical.batch_ray import run_items
    a = _png(tmp_path / "a.png", 50)
    s = run_items([str(tmp_path / "none.png"), str(a)], tmp_path / "job", plan=str(tiny_plan), k=1, steps=1,
                  use_ray=False)
    assert s["done"] == ["a"] and list(s["failed"]) == ["none"]
    assert [p.name for p in (tmp_path / "job" / "none").iterdir()] == ["error.json"]
