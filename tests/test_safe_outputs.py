"""Issue #25 part 1: outputs never destroy anything (docs/outputs.md): an output never replaces an
input, paths are checked before any work, an output folder is replaced whole (no stale files),
something msld did not write is refused without --overwrite, names are unique per input, and no
temporary file is left behind on failure."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msld_sdk.cli.main import main
from msld_sdk.errors import OutputError
from msld_sdk.outputs import output_names
from msld_sdk.plan import Plan, write_plan
from msld_sdk.writing import TMP_PREFIX, atomic_path, check_output_file, check_output_folder, is_msld_folder

MASKS_K2 = ["confidence.png", "consensus.png", "mask_00.png", "mask_01.png", "mean.png", "overlay.png"]


def _tmp_left(root: Path) -> list:
    return [p for p in root.rglob("*") if TMP_PREFIX in p.name or p.name.endswith(".tmp")]


def _png(path: Path, value: int = 90, size=(24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _seg(*args):
    return main(["segment", *map(str, args), "--steps", "1", "--seed", "0", "-q"])


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


@pytest.fixture
def tiny_cfg(tmp_path):
    from msld_export.model.config import tiny_config
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    return cfg


# ---- msld import / export: the plan file -----------------------------------------------------
def test_import_out_equal_to_the_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    ckpt, cfg = tmp_path / "cp.ckpt", tmp_path / "c.yaml"
    ckpt.write_bytes(b"the checkpoint, precious")
    cfg.write_text("model: {}\n")
    assert main(["import", str(ckpt), "--config", str(cfg), "--out", str(ckpt)]) == 2
    err = _err_line(capsys)
    assert f"--out {ckpt} is an input" in err and "choose another --out" in err
    assert ckpt.read_bytes() == b"the checkpoint, precious"
    assert main(["import", str(ckpt), "--config", str(cfg), "--out", str(cfg), "--overwrite"]) == 2   # never
    assert cfg.read_text() == "model: {}\n" and not _tmp_left(tmp_path)


def test_import_out_an_existing_folder_is_one_line(tmp_path, capsys):
    ckpt, cfg, folder = tmp_path / "cp.ckpt", tmp_path / "c.yaml", tmp_path / "plans"
    ckpt.write_bytes(b"x")
    cfg.write_text("model: {}\n")
    folder.mkdir()
    assert main(["import", str(ckpt), "--config", str(cfg), "--out", str(folder)]) == 2
    err = _err_line(capsys)
    assert "is a folder; --out names a file, e.g." in err
    assert list(folder.iterdir()) == [] and not _tmp_left(tmp_path)


def test_export_out_missing_folder_is_created_and_existing_folder_refused(tmp_path, tiny_cfg, capsys):
    out = tmp_path / "missing_dir" / "x.plan"
    assert main(["export", "--random", "--config", str(tiny_cfg), "--out", str(out)]) == 0
    assert Plan.open(out).manifest["provenance"]["trained"] is False
    assert main(["export", "--random", "--config", str(tiny_cfg), str(tmp_path / "missing_dir")]) == 2
    assert "is a folder" in _err_line(capsys)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.plan"]


def test_out_under_a_file_is_refused_before_any_work(tmp_path, tiny_cfg, capsys):
    (tmp_path / "afile").write_text("keep")
    assert main(["export", "--random", "--config", str(tiny_cfg), "--out", str(tmp_path / "afile" / "x.plan")]) == 2
    assert "cannot create the folder" in _err_line(capsys)
    assert (tmp_path / "afile").read_text() == "keep"


def test_an_existing_file_msld_did_not_write_is_refused_without_overwrite(tmp_path, tiny_cfg, capsys):
    out = tmp_path / "notes.plan"
    out.write_text("my notes")
    assert main(["export", "--random", "--config", str(tiny_cfg), "--out", str(out)]) == 2
    assert "exists and msld did not write it; pass --overwrite" in _err_line(capsys)
    assert out.read_text() == "my notes"
    assert main(["export", "--random", "--config", str(tiny_cfg), "--out", str(out), "--overwrite"]) == 0
    assert Plan.open(out).manifest["format"] == "msld-plan"
    # a plan msld wrote is replaced whole without --overwrite
    assert main(["export", "--random", "--config", str(tiny_cfg), "--seed", "3", "--out", str(out)]) == 0
    assert Plan.open(out).manifest["provenance"]["random_seed"] == 3


def test_write_plan_failure_leaves_the_old_plan_and_no_temporary(tmp_path, tiny_plan, monkeypatch):
    out = tmp_path / "p.plan"
    out.write_bytes(Path(tiny_plan).read_bytes())
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    with pytest.raises(OSError, match="No space"):
        write_plan(out, {"x": 1}, {"g": ("graphs/g.onnx", b"123")})
    assert out.read_bytes() == before and not _tmp_left(tmp_path)


def test_atomic_path_keeps_the_suffix_and_cleans_up(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.nii.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith("a.nii.gz") and tmp.name.startswith(TMP_PREFIX)
            tmp.write_text("half")
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


# ---- msld segment: the output folder ---------------------------------------------------------
def test_k4_then_k2_into_the_same_out_leaves_no_stale_masks(tmp_path, tiny_plan):
    img, out = _png(tmp_path / "in.png"), tmp_path / "out"
    assert _seg(img, "--plan", tiny_plan, "-k", "4", "-o", out) == 0
    assert (out / "mask_03.png").exists()
    assert _seg(img, "--plan", tiny_plan, "-k", "2", "-o", out) == 0
    assert sorted(p.name for p in out.iterdir()) == MASKS_K2
    assert not _tmp_left(tmp_path)


def test_segment_out_an_existing_file_is_one_line(tmp_path, tiny_plan, capsys):
    a = tmp_path / "a.npy"
    np.save(a, np.zeros((16, 16), np.float32))
    f = tmp_path / "existing_file"
    f.write_text("keep me")
    assert _seg(a, "--plan", tiny_plan, "-k", "2", "-o", f) == 2
    assert "-o/--out " + str(f) + " is a file; -o/--out names a folder" in _err_line(capsys)
    assert f.read_text() == "keep me"


def test_segment_out_holding_foreign_files_needs_overwrite(tmp_path, tiny_plan, capsys):
    img, out = _png(tmp_path / "in.png"), tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("years of work")
    assert _seg(img, "--plan", tiny_plan, "-k", "2", "-o", out) == 2
    err = _err_line(capsys)
    assert "holds files msld did not write (e.g. thesis.docx)" in err and "--overwrite" in err
    assert (out / "thesis.docx").read_text() == "years of work"
    assert _seg(img, "--plan", tiny_plan, "-k", "2", "-o", out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == MASKS_K2


def test_segment_out_holding_an_input_is_refused_even_with_overwrite(tmp_path, tiny_plan, capsys):
    img = _png(tmp_path / "data" / "in.png")
    assert _seg(img, "--plan", tiny_plan, "-k", "2", "-o", tmp_path / "data", "--overwrite") == 2
    assert "holds the input" in _err_line(capsys)
    assert img.exists() and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["in.png"]


def test_failed_single_input_keeps_the_earlier_output(tmp_path, tiny_plan, capsys):
    img, out = _png(tmp_path / "in.png"), tmp_path / "out"
    assert _seg(img, "--plan", tiny_plan, "-k", "2", "-o", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _seg(tmp_path / "missing.png", "--plan", tiny_plan, "-k", "3", "-o", out) == 1
    assert "image file not found" in _err_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not _tmp_left(tmp_path)


def test_same_file_names_from_different_folders_get_different_outputs(tmp_path, tiny_plan):
    a = _png(tmp_path / "LIDC-IDRI-0004" / "nodule-0" / "image" / "slice-0.png", 60)
    b = _png(tmp_path / "LIDC-IDRI-0011" / "nodule-0" / "image" / "slice-0.png", 200)
    out = tmp_path / "out"
    assert _seg(a, b, "--plan", tiny_plan, "-k", "1", "-o", out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["LIDC-IDRI-0004_nodule-0_image_slice-0", "LIDC-IDRI-0011_nodule-0_image_slice-0"]
    m0, m1 = (np.asarray(Image.open(out / n / "overlay.png")) for n in names)
    assert not np.array_equal(m0, m1)                         # each its own input, none over the other


def test_output_names_are_unique():
    assert output_names(["a/x.png", "b/y.png"], whole_suffix=False) == ["x", "y"]
    assert output_names(["a/x.png", "b/x.png"], whole_suffix=False) == ["a_x", "b_x"]
    assert output_names(["/d/p1/n/i/s.png", "/d/p2/n/i/s.png"], whole_suffix=False) == ["p1_n_i_s", "p2_n_i_s"]
    names = output_names(["s.png", "s.png", "s.png"], whole_suffix=False)
    assert len(set(names)) == 3 and names[1].endswith("_2") and names[2].endswith("_3")
    assert output_names(["ct.nii.gz", "x/ct.nii.gz"])[1] == "x_ct"


def test_the_rule_as_functions(tmp_path):
    (tmp_path / "in.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="is an input"):
        check_output_file(tmp_path / "." / "in.png", [tmp_path / "in.png"])
    with pytest.raises(OutputError, match="holds the input"):
        check_output_folder(tmp_path, [tmp_path / "in.png"])
    d = tmp_path / "o"
    (d / "x").mkdir(parents=True)
    (d / "x" / "mask_00.png").write_bytes(b"")
    (d / "x" / "done.json").write_text("{}")
    assert is_msld_folder(d)
    (d / "x" / "notes.txt").write_text("")
    assert not is_msld_folder(d)
    assert isinstance(OutputError("x"), ValueError)
