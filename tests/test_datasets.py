"""msld_sdk.evaluation.datasets (runtime side, no torch): the folder kind, and msld eval on a folder."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msld_sdk.cli import main
from msld_sdk.evaluation.datasets import FOLDER, default_data_root, is_folder_pair, load_split

DATA_ROOT = default_data_root()


def write_folder(root, n=3, size=(40, 30), mask_scale=255, suffixes=(".png", ".png")):
    """n random RGB images and masks (a rectangle each) in root/images and root/masks."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"case{i}{suffixes[0]}")
        m = np.zeros((size[1], size[0]), np.uint8)
        m[5:20, 4 + i:25] = mask_scale
        Image.fromarray(m).save(root / "masks" / f"case{i}{suffixes[1]}")
    return root


def test_folder_pairs_by_file_name_and_reads_0_255_and_0_1_masks(tmp_path):
    a = load_split(FOLDER, write_folder(tmp_path / "a"), "val", 16)
    b = load_split(FOLDER, write_folder(tmp_path / "b", mask_scale=1, suffixes=(".jpg", ".png")), "val", 16, channels=1)
    assert a.ids == ["case0", "case1", "case2"] and a.images.shape == (3, 3, 16, 16) and a.masks.shape == (3, 1, 16, 16)
    assert b.images.shape == (3, 1, 16, 16)
    assert np.array_equal(a.masks, b.masks) and a.masks.sum() > 0 and set(np.unique(a.masks)) == {0, 1}
    assert is_folder_pair(tmp_path / "a") and not is_folder_pair(tmp_path)


def test_folder_palette_masks_and_stray_files(tmp_path):
    root = write_folder(tmp_path / "p", n=2)
    for f in (root / "masks").iterdir():     # as palette PNGs: index 1 = a dark colour
        m = Image.open(f).point(lambda v: 1 if v else 0).convert("P")
        m.putpalette([0, 0, 0, 60, 0, 0] + [0] * 762)
        m.save(f)
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "masks" / "extra.png").write_bytes((root / "masks" / "case0.png").read_bytes())
    d = load_split(FOLDER, root, "val", 16)
    assert d.ids == ["case0", "case1"] and d.masks.sum() > 0


def test_folder_errors_name_the_problem(tmp_path):
    root = write_folder(tmp_path / "m", n=2)
    (root / "masks" / "case1.png").unlink()
    with pytest.raises(FileNotFoundError, match="case1"):
        load_split(FOLDER, root, "val", 16)
    with pytest.raises(FileNotFoundError, match="no images/ and masks/"):
        load_split(FOLDER, tmp_path, "val", 16)


def test_eval_command_on_a_folder(tmp_path, tiny_plan, capsys):
    root = write_folder(tmp_path / "data")
    args = ["eval", "--plan", str(tiny_plan), "--data", str(root), "--k", "2", "--steps", "2", "-q"]
    assert main(args + ["--json", str(tmp_path / "auto.json")]) == 0          # images/ + masks/: folder kind
    assert main(args + ["--kind", "folder", "--json", str(tmp_path / "explicit.json")]) == 0
    auto, explicit = (json.loads((tmp_path / f).read_text()) for f in ("auto.json", "explicit.json"))
    assert auto["kind"] == "folder" and auto["split"] == "all" and auto["n_images"] == 3
    assert auto["metrics"] == explicit["metrics"] and "ged" not in auto["metrics"]
    from msld_sdk.plan import Plan
    assert auto["plan_graphs_sha256"] == Plan.open(tiny_plan).graphs_sha256   # which model made the figures
    (root / "masks" / "case2.png").unlink()
    assert main(args) == 1
    assert "case2" in capsys.readouterr().err


def test_eval_on_a_folder_imports_neither_torch_nor_scipy(tmp_path, tiny_plan):
    root = write_folder(tmp_path / "data", n=2)
    code = ("import sys; from msld_sdk.cli import main; "
            f"rc = main(['eval', '--plan', {str(tiny_plan)!r}, '--data', {str(root)!r}, '--k', '2', '--steps', '1', "
            "'-q']); assert rc == 0, rc; "
            "bad = [m for m in ('torch', 'scipy', 'msld_export') if m in sys.modules]; assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_eval_without_data_says_how_to_give_it(tmp_path, tiny_plan, capsys):
    assert main(["eval", "--plan", str(tiny_plan), "--kind", "lidc", "--data", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data" in err and "MSLD_DATA" in err, err


def test_middle_slice_per_nodule():
    from msld_sdk.evaluation.datasets import SegData, middle_slice_per_nodule

    ids = ["P1/nodule-0/slice-3", "P1/nodule-0/slice-7", "P1/nodule-0/slice-10",
           "P1/nodule-1/slice-0", "P1/nodule-1/slice-1", "P2/nodule-0/slice-4"]
    n = len(ids)
    ds = SegData("lidc", "val", np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.zeros((n, 4, 1, 1), np.uint8),
                 ids, [i.split("/")[0] for i in ids])
    one = middle_slice_per_nodule(ds)
    assert one.ids == ["P1/nodule-0/slice-7", "P1/nodule-1/slice-0", "P2/nodule-0/slice-4"]
    assert one.images[:, 0, 0, 0].tolist() == [1, 3, 5] and one.groups == ["P1", "P1", "P2"]
    with pytest.raises(ValueError, match="LIDC only"):
        middle_slice_per_nodule(SegData("cvc", "val", ds.images, ds.masks[:, :1], ids, ids))


@pytest.mark.skipif(not (DATA_ROOT / "cvc-clinicdb").is_dir(), reason="CVC-ClinicDB not under the data root")
@pytest.mark.parametrize("jpeg_quality", [None, 95])
def test_packed_split_reads_back(tmp_path, jpeg_quality):
    """A split packed for the GPU machine loads as the split itself: exactly with raw pixels;
    with JPEG images, masks and ids exactly and images within the codec's loss at quality 95."""
    from msld_sdk.evaluation.datasets import pack_split

    orig = load_split("cvc", DATA_ROOT, "val", 32)
    pack_split("cvc", DATA_ROOT, "val", 32, tmp_path, jpeg_quality=jpeg_quality)
    back = load_split("cvc", tmp_path, "val", 32)
    assert back.ids == orig.ids and back.groups == orig.groups and np.array_equal(back.masks, orig.masks)
    if jpeg_quality is None:
        assert np.array_equal(back.images, orig.images)
    else:
        mse = np.mean((back.images.astype(np.float64) - orig.images) ** 2)
        assert back.images.shape == orig.images.shape and 10 * np.log10(255 ** 2 / mse) > 30   # PSNR in dB
