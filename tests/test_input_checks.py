"""Inputs checked against the plan (issue #25, part 2): integer dtypes, channels, scale, DICOM
modality, series geometry, intensity records of imported plans, full-size outputs without
full-size temporaries."""
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_series import INTERCEPT, SLOPE, THICKNESS, phantom, write_series
from msld_sdk import InputError, Segmenter
from msld_sdk import image_input
from msld_sdk.evaluation.evaluate import Sample, evaluate, format_report

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MSLD_REFERENCE_DIR", ROOT.parent / "shared" / "reference")) / "lidc"
NODULE = (120, 90, 4)


@pytest.fixture(scope="module")
def tiny(tiny_plan):
    return Segmenter(tiny_plan)


@pytest.fixture(scope="module")
def lidc():
    return Segmenter("lidc")


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "msld_sdk"]


# ---- integer dtypes: one rule by value ----------------------------------------------------------
def test_equal_integer_values_give_equal_masks_whatever_the_dtype(tiny, rng):
    u8 = rng.integers(0, 201, (40, 36), dtype=np.uint8)          # 0..200: never reaches 255
    runs = [tiny.run(u8.astype(dt), k=2, steps=2, seed=3) for dt in (np.uint8, np.int32, np.int64, np.uint16,
                                                                    np.int16)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.masks, runs[0].masks)
        np.testing.assert_array_equal(r.mean, runs[0].mean)
    # uint8 keeps its mapping bit for bit: values / 255
    np.testing.assert_array_equal(image_input.load_image(u8)[:, :, 0], u8.astype(np.float32) / 255.0)
    # 16-bit values: / 65535 whatever the dtype
    u16 = (u8.astype(np.uint16) * 300)
    a, b = (image_input.load_image(u16.astype(dt)) for dt in (np.uint16, np.int32))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :, 0], u16.astype(np.float32) / 65535.0)


def test_integers_outside_16_bits_are_rescaled_with_a_warning(caplog):
    hu = np.linspace(-1024, 400, 64).astype(np.int16).reshape(8, 8)
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        x = image_input.load_image(hu)
    assert _warnings(caplog) == ["msld_sdk: image values are outside [0, 1] (integer values -1024..400, outside "
                                 "0..65535); rescaling by min/max to [0, 1]"]
    assert x.min() == 0 and x.max() == 1


# ---- channels: converted, with one warning naming the plan's training input ---------------------------
def test_colour_photo_to_a_greyscale_plan_warns(tiny, rng, caplog):
    photo = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    grey_rgb = np.repeat(photo[:, :, :1], 3, axis=2)             # grey saved as RGB is grey: no warning
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        tiny.run(grey_rgb, k=1, steps=1, seed=0)
        assert _warnings(caplog) == []
        r = tiny.run(photo, k=1, steps=1, seed=0)
    assert r.masks.shape == (1, 30, 30)
    assert _warnings(caplog) == [
        "msld_sdk: a colour image given to a plan trained on one-channel greyscale images; it is converted to "
        "luminance and the masks are unlikely to mean anything. Give the plan greyscale images, or use a plan "
        "trained on colour images"]


def test_grey_image_to_a_colour_plan_warns(tiny_rgb_plan, rng, caplog):
    seg = Segmenter(tiny_rgb_plan)
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        seg.run(rng.random((20, 30), dtype=np.float32), k=1, steps=1, seed=0)
    assert _warnings(caplog) == [
        "msld_sdk: a greyscale image given to a plan trained on colour images; its grey is repeated over three "
        "channels and the masks are unlikely to mean anything. Give the plan colour images, or use a plan trained "
        "on greyscale images"]


def test_eval_of_colour_photos_with_the_lidc_plan_says_so_once(lidc, rng, caplog):
    samples = [Sample(rng.random((128, 128, 3), dtype=np.float32), np.zeros((1, 128, 128), bool), f"p{i}")
               for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        rep = evaluate(lidc, samples, k=1, steps=1, seed=0)
    want = ("msld_sdk: a colour image given to a plan trained on one-channel CT images; it is converted to "
            "luminance and the masks are unlikely to mean anything. Give the plan CT images, or use a plan trained "
            "on colour images")
    assert rep["n_images"] == 3
    assert rep["input_warnings"] == [want]
    assert _warnings(caplog) == [want]                  # logged once, not once per image
    assert f"WARNING: {want}" in format_report(rep)
    assert list(rep)[-1] == "per_image"


# ---- scale ----------------------------------------------------------------------------------------
def test_image_much_larger_than_the_training_input_warns(tiny, caplog):
    h0, w0 = tiny.plan.manifest["input"]["size"]
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        tiny.run(np.zeros((h0 * 2, w0 * 2), np.float32), k=1, steps=1, seed=0)
        assert _warnings(caplog) == []
        tiny.run(np.zeros((4, w0 * 16), np.float32), k=1, steps=1, seed=0)
    f = 16
    assert _warnings(caplog) == [
        f"msld_sdk: a 4 x {w0 * 16} image is {f} times the {h0} x {w0} input the plan was trained on (per side); it "
        f"is shrunk to that size, so detail under {f} pixels is lost, and every output is made at full size "
        f"({4 * w0 * 16 * 49 / 1e9:.1f} GB of arrays at k=8). Crop or downscale it first when that is not wanted"]


# ---- full-size outputs without full-size temporaries -----------------------------------------------
@pytest.mark.parametrize("src,dst", [((32, 32), (150, 170)), ((128, 128), (517, 389)), ((20, 30), (300, 30)),
                                     ((128, 128), (40, 900)), ((64, 64), (64, 65))])
def test_strip_resize_is_bit_identical_to_pil(monkeypatch, rng, src, dst):
    planes = rng.random((2,) + src, dtype=np.float32)
    want = np.stack([np.asarray(Image.fromarray(p, mode="F").resize(dst[::-1], Image.BILINEAR)) for p in planes])
    monkeypatch.setattr(image_input, "STRIP_PIXELS", 100)      # strips of a few columns
    got = image_input.resize_planes(planes, dst)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---- DICOM modality --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "CT1"
    write_series(folder, phantom(nodule=NODULE), shuffle_names=False)
    return folder


def _rewrite(path, **attrs):
    import pydicom
    ds = pydicom.dcmread(str(path))
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)


def _copy_series(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


MR_REFUSED = ("{p}: DICOM modality MR, but medseglatdiff-lidc was trained on CT images (DICOM CT); its values would "
              "be read as CT values. Give a CT image, or pass allow_modality=True (CLI: --allow-modality) to "
              "segment it anyway")


def test_single_mr_image_is_not_segmented_as_hounsfield_units(lidc, series, tmp_path, caplog):
    from msld_sdk.clinical.volume import load_volume, segment_volume
    from msld_sdk.outputs import segment_and_write

    mr = tmp_path / "mr.dcm"
    mr.write_bytes(sorted(series.iterdir())[4].read_bytes())
    _rewrite(mr, Modality="MR")
    name = lidc.plan.manifest["model"]["name"]
    want = MR_REFUSED.replace("medseglatdiff-lidc", name)
    with pytest.raises(InputError) as e:                 # msld segment mr.dcm: a series of one
        segment_and_write(lidc, mr, tmp_path / "out", volume=True, k=1, steps=1, seed=0)
    assert str(e.value) == want.format(p=str(mr))
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError) as e:                 # Segmenter.run(path): read through its window
        lidc.run(mr, k=1, steps=1, seed=0)
    assert str(e.value) == want.format(p=mr)
    with pytest.raises(InputError, match="DICOM modality MR"):
        lidc.run(mr, k=1, steps=1, seed=0, allow_modality="PT")
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        vr = segment_volume(lidc, load_volume(mr), roi=(120, 90), k=1, steps=1, seed=0, allow_modality=True)
        r = lidc.run(mr, k=1, steps=1, seed=0, allow_modality="MR")
    assert vr.masks.shape == (1, 1, 200, 220) and r.masks.shape == (1, 200, 220)
    msg = (f"msld_sdk: {{p}}: DICOM modality MR given to {name}, trained on CT images (allowed by allow_modality); "
           "its values are read as CT values and the masks may mean nothing")
    assert _warnings(caplog)[0] == msg.format(p=str(mr)) and msg.format(p=mr) in _warnings(caplog)


def test_archive_jobs_carry_the_input_checks_overrides(tmp_path):
    """msld segment --ray / run_items: --allow-modality reaches every item (it was dropped there, so
    the error's own advice did nothing) and is part of the job record a resume must match."""
    import json
    from msld_sdk.clinical.batch_ray import run_items
    mr = tmp_path / "MR1"
    write_series(mr, phantom(n_slices=3, nodule=NODULE), modality="MR")
    kw = dict(plan="lidc", k=1, steps=1, roi=(NODULE[0], NODULE[1]), use_ray=False)
    s = run_items([str(mr)], tmp_path / "refused", **kw)
    assert not s["done"] and "DICOM modality MR" in next(iter(s["failed"].values()))
    s = run_items([str(mr)], tmp_path / "allowed", allow_modality="MR", **kw)
    assert len(s["done"]) == 1 and not s["failed"]
    assert json.loads((tmp_path / "allowed" / "job.json").read_text())["allow_modality"] == "MR"


def test_archive_jobs_refuse_options_that_do_not_fit_the_inputs(tmp_path, capsys):
    """The pre-flight checks of msld segment also run before a --ray job: --slices on an image."""
    from msld_sdk.cli.main import main
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(img)
    assert main(["segment", str(img), "--ray", "--slices", "0", "2", "-o", str(tmp_path / "o")]) == 2
    assert "--slices applies to series and volumes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_seg_and_pt_refused_and_plans_without_a_modality_accept_all(lidc, tiny, series, tmp_path):
    f = tmp_path / "x.dcm"
    f.write_bytes(sorted(series.iterdir())[0].read_bytes())
    for mod in ("PT", "SEG"):
        _rewrite(f, Modality=mod)
        with pytest.raises(InputError, match=f"DICOM modality {mod}, but .* was trained on CT images"):
            lidc.run(f, k=1, steps=1, seed=0)
    assert tiny.run(f, k=1, steps=1, seed=0).masks.shape == (1, 200, 220)   # tiny: no modality recorded


# ---- series geometry -------------------------------------------------------------------------------
def _positions(folder):
    import pydicom
    return {f.name: pydicom.dcmread(str(f)).ImagePositionPatient[2] for f in sorted(folder.iterdir())}


SUFFIX = (". Fix the series (remove duplicates, add the missing slices), or pass accept_irregular=True (CLI: "
          "--accept-irregular-slices) to segment every slice at its true position (result.npz and DICOM SEG keep "
          "the positions, a SEG only if no two slices share one; no NIfTI, whose affine cannot hold them)")


def test_missing_slice_is_refused_naming_it(series, tmp_path):
    from msld_sdk.clinical.volume import load_series
    d = _copy_series(series, tmp_path / "gap")
    (d / "IM0003.dcm").unlink()
    with pytest.raises(InputError) as e:
        load_series(d)
    assert str(e.value) == (f"{d}: the slices do not form a regular grid: 1 slice(s) missing between slice 2 "
                            f"(IM0002.dcm) and slice 3 (IM0004.dcm) (5 mm apart, spacing 2.5 mm)" + SUFFIX)


def test_duplicate_position_is_refused_naming_both(series, tmp_path):
    from msld_sdk.clinical.volume import load_series
    d = _copy_series(series, tmp_path / "dup")
    _rewrite(d / "IM0005.dcm", ImagePositionPatient=list(_dicom_position(d / "IM0004.dcm")))
    with pytest.raises(InputError) as e:
        load_series(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}: the slices do not form a regular grid: ")
    assert "are at the same position [-150.0, -170.0, -290.0]" in msg
    assert "(IM0004.dcm)" in msg and "(IM0005.dcm)" in msg and msg.endswith(SUFFIX)


def _dicom_position(f):
    import pydicom
    return [float(v) for v in pydicom.dcmread(str(f)).ImagePositionPatient]


def test_uneven_positions_refused_or_accepted_with_the_true_positions(lidc, series, tmp_path, caplog):
    from msld_sdk.clinical.volume import load_series, save_nifti_outputs, segment_volume
    from msld_sdk.outputs import segment_and_write

    d = _copy_series(series, tmp_path / "uneven")
    _rewrite(d / "IM0006.dcm", ImagePositionPatient=[-150.0, -170.0, -300.0 + 6 * THICKNESS + 0.8])
    with pytest.raises(InputError) as e:
        load_series(d)
    assert str(e.value) == (
        f"{d}: the slices do not form a regular grid: slice 5 (IM0005.dcm) and slice 6 (IM0006.dcm) are 3.3 mm "
        f"apart, the series' spacing is 2.5 mm; slice 6 (IM0006.dcm) and slice 7 (IM0007.dcm) are 1.7 mm apart, "
        f"the series' spacing is 2.5 mm" + SUFFIX)
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        vol = load_series(d, accept_irregular=True)
    assert not vol.regular and "irregular slice geometry accepted" in _warnings(caplog)[0]
    np.testing.assert_allclose(vol.positions[:, 2], [-300 + z * THICKNESS + (0.8 if z == 6 else 0) for z in range(8)])
    vr = segment_volume(lidc, vol, roi=(120, 90), slices=(5, 8), k=1, steps=1, seed=0)
    with pytest.raises(InputError, match="cannot be held by a NIfTI affine"):
        save_nifti_outputs(tmp_path / "nii", vr, vol)
    w = segment_and_write(lidc, d, tmp_path / "out", volume=True, roi=(120, 90), slices=(5, 8), k=1, steps=1,
                          seed=0, npz="geometry", nifti="if_installed", accept_irregular=True)
    assert w.files == ["result.npz"]
    npz = np.load(tmp_path / "out" / "result.npz")
    np.testing.assert_array_equal(npz["positions"], vol.positions)
    assert "affine" not in npz.files   # no one affine holds these slices: an even-step one would mislocate them


def test_mixed_pixel_spacing_is_refused_even_when_irregular_slices_are_accepted(series, tmp_path):
    from msld_sdk.clinical.volume import load_series
    d = _copy_series(series, tmp_path / "spacing")
    _rewrite(d / "IM0003.dcm", PixelSpacing=[0.9, 0.9])
    for accept in (False, True):
        with pytest.raises(InputError, match=r"slice 3 \(IM0003.dcm\) has PixelSpacing \[0.9, 0.9\], .* \[0.7, 0.7\]; "
                                             "one series must share one pixel grid"):
            load_series(d, accept_irregular=accept)


def test_slices_without_positions_give_no_made_up_geometry(lidc, series, tmp_path, caplog):
    """Ordered by InstanceNumber with a warning, as before; but a NIfTI affine or a SEG would have
    to invent the positions: both are refused by name, and `msld segment` writes result.npz."""
    import pydicom
    from msld_sdk.clinical.dicom_seg import write_dicom_seg
    from msld_sdk.clinical.volume import load_series, save_nifti_outputs, segment_volume
    from msld_sdk.outputs import segment_and_write
    d = _copy_series(series, tmp_path / "nopos")
    for f in d.iterdir():
        ds = pydicom.dcmread(str(f))
        del ds.ImagePositionPatient
        ds.save_as(str(f), enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        vol = load_series(d)
    assert not vol.regular and vol.positions is None and "ordered by InstanceNumber" in caplog.text
    vr = segment_volume(lidc, vol, roi=(120, 90), slices=(3, 5), k=1, steps=1, seed=0)
    with pytest.raises(InputError, match="without ImagePositionPatient: their positions, and so a NIfTI affine"):
        save_nifti_outputs(tmp_path / "nii", vr, vol)
    with pytest.raises(InputError, match="a DICOM SEG needs every slice's position"):
        write_dicom_seg(tmp_path / "seg.dcm", vr, vol, lidc.plan.manifest)
    w = segment_and_write(lidc, d, tmp_path / "out", volume=True, roi=(120, 90), slices=(3, 5), k=1, steps=1,
                          seed=0, npz="geometry", nifti="if_installed")
    assert w.files == ["result.npz"] and "affine" not in np.load(tmp_path / "out" / "result.npz").files


def test_duplicate_positions_accepted_give_a_clear_seg_refusal(lidc, series, tmp_path):
    from msld_sdk.clinical.dicom_seg import write_dicom_seg
    from msld_sdk.clinical.volume import load_series, segment_volume
    d = _copy_series(series, tmp_path / "dup")
    import pydicom
    _rewrite(d / "IM0004.dcm", ImagePositionPatient=list(pydicom.dcmread(str(d / "IM0003.dcm")).ImagePositionPatient))
    vol = load_series(d, accept_irregular=True)
    vr = segment_volume(lidc, vol, roi=(120, 90), slices=(3, 5), k=1, steps=1, seed=0)
    with pytest.raises(InputError, match="two slices share one position .* a DICOM SEG cannot hold"):
        write_dicom_seg(tmp_path / "seg.dcm", vr, vol, lidc.plan.manifest)


def test_mixed_orientation_is_refused(series, tmp_path):
    from msld_sdk.clinical.volume import load_series
    d = _copy_series(series, tmp_path / "tilt")
    _rewrite(d / "IM0002.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0.9848, 0.1736])
    with pytest.raises(InputError, match=r"slice 2 \(IM0002.dcm\) has orientation \[1.0, 0.0, 0.0, 0.0, 0.9848, "
                                         r"0.1736\], slice 0 \(IM0000.dcm\) \[1.0, 0.0, 0.0, 0.0, 1.0, 0.0\]"):
        load_series(d)


def test_regular_series_is_unchanged(series):
    from msld_sdk.clinical.volume import load_series
    vol = load_series(series)
    assert vol.regular and vol.modality == "CT" and vol.positions.shape == (8, 3)
    np.testing.assert_allclose(vol.spacing, (THICKNESS, 0.7, 0.7))
    assert vol.hu.dtype == np.float32 and float(vol.hu.min()) >= INTERCEPT * SLOPE


# ---- intensity records: plans without one, and imported plans --------------------------------------
def test_plan_without_an_intensity_record_names_the_fix(tiny, series):
    from msld_sdk.clinical.volume import load_series, segment_volume
    with pytest.raises(InputError) as e:
        segment_volume(tiny, load_series(series), roi=(120, 90), slices=(4, 5), k=1, steps=1, seed=0)
    assert "python -m msld_export.training.training_input PLAN --kind lidc" in str(e.value)
    assert "msld import" in str(e.value)


def test_reference_dataset_is_read_from_the_config():
    from msld_export.training.training_input import reference_dataset, reference_training_input
    assert reference_dataset({"data": {"dataset_name": "lidc"}}) == ("lidc", "data.dataset_name")
    assert reference_dataset({"data": {"dataset_name": "cvc_clinic"}}) == ("cvc", "data.dataset_name")
    assert reference_dataset({"model": {"net": {"autoencoder_weight_path": "logs/x/runs/lidc_mask/last.ckpt"}}}) \
        == ("lidc", "model.net.autoencoder_weight_path")
    rec = reference_training_input({"data": {"dataset_name": "isic"}}, 256, 3, [0.5] * 3, [0.5] * 3)
    assert rec["kind"] == "whole_image" and "modality" not in rec and rec["dataset"] is None
    assert rec["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "after": "[0, 1]"} and rec["channels"] == 3


@pytest.mark.skipif(not (REFERENCE / "last.ckpt").exists(), reason=f"reference fixture {REFERENCE} is absent "
                    "(set MSLD_REFERENCE_DIR)")
def test_imported_lidc_plan_records_intensity_and_segments_a_ct_series(series, tmp_path):
    pytest.importorskip("torch")
    from msld_export.reference.importer import main as import_main
    from msld_sdk.clinical.volume import load_series, segment_volume

    out = tmp_path / "ref.plan"
    assert import_main([str(REFERENCE / "last.ckpt"), "--config", str(REFERENCE / "config.yaml"),
                        "--out", str(out)]) == 0
    seg = Segmenter(out)
    rec = seg.plan.manifest["training_input"]
    assert rec["intensity"]["kind"] == "minmax" and rec["intensity"]["over"] == "crop"
    assert rec["modality"] == "CT" and rec["kind"] == "crop" and rec["crop_size"] == [128, 128]
    assert rec["channels"] == 1 and rec["image_size"] == [128, 128]
    assert rec["normalize"] == {"mean": [0.5], "std": [0.5], "after": "[0, 1]"}
    assert rec["dataset"] == "lidc" and rec["dataset_from"] == "model.net.autoencoder_weight_path"
    # docs/clinical_workflow.md's CT-series example, on the imported plan
    vol = load_series(series)
    vr = segment_volume(seg, vol, roi=(120, 90), slices=(3, 6), k=2, steps=2, seed=0)
    assert vr.masks.shape == (2,) + vol.shape and vr.slices == (3, 6) and vr.roi == (56, 26, 184, 154)
    assert vr.mean[3:6, 26:154, 56:184].any() or vr.confidence[3:6, 26:154, 56:184].any()


def test_collected_warnings_belong_to_their_own_thread(caplog):
    """msld eval collects (and logs once) its own warnings; another thread's run going on at the
    same time keeps every warning of its own and none is counted as the evaluation's."""
    import threading
    from msld_sdk.input_checks import collect_warnings, log
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        with collect_warnings() as seen:
            log.warning("msld_sdk: mine")
            log.warning("msld_sdk: mine")
            other = threading.Thread(target=lambda: [log.warning("msld_sdk: theirs") for _ in range(2)])
            other.start()
            other.join()
    assert seen == ["msld_sdk: mine"]
    assert _warnings(caplog) == ["msld_sdk: mine", "msld_sdk: theirs", "msld_sdk: theirs"]
