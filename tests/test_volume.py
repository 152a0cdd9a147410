"""CT series (DICOM folder) and NIfTI volumes: ordering, Hounsfield units, 3-D regions, one batch,
outputs in the series' geometry; DICOM SEG written with highdicom and read back."""
import numpy as np
import pytest

from ct_series import INTERCEPT, ORIGIN, SLOPE, SPACING, THICKNESS, phantom, write_series
from msld_sdk import InputError, Segmenter
from msld_sdk.cli import main
from msld_sdk.roi import normalise_crop, training_input
from msld_sdk.clinical.volume import load_nifti, load_series, segment_volume

pytest.importorskip("pydicom")
NODULE = (120, 90, 4)        # x, y, z of the phantom's nodule


@pytest.fixture(scope="module")
def lidc():
    return Segmenter("lidc")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    hu = phantom(nodule=NODULE)
    folder = tmp_path_factory.mktemp("series") / "CT1"
    datasets = write_series(folder, hu)
    return folder, hu, datasets


def test_series_is_ordered_by_position_in_hounsfield_units(series):
    folder, hu, datasets = series
    vol = load_series(folder)
    assert vol.shape == hu.shape and vol.source == "dicom"
    np.testing.assert_array_equal(vol.hu, np.round((hu - INTERCEPT) / SLOPE) * SLOPE + INTERCEPT)  # stored x slope + intercept
    assert [d.SOPInstanceUID for d in vol.datasets] == [d.SOPInstanceUID for d in datasets]
    np.testing.assert_allclose(vol.spacing, (THICKNESS, SPACING[0], SPACING[1]))
    # voxel (x=0, y=0, z=0) is the first slice's ImagePositionPatient (LPS), in RAS
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [-ORIGIN[0], -ORIGIN[1], ORIGIN[2], 1])
    np.testing.assert_allclose(vol.affine @ [0, 0, 3, 1], [-ORIGIN[0], -ORIGIN[1], ORIGIN[2] + 3 * THICKNESS, 1])


def test_region_is_segmented_in_one_batch_through_the_plans_hu_mapping(lidc, series):
    folder, hu, _ = series
    vol = load_series(folder)
    x, y, _ = NODULE
    vr = segment_volume(lidc, vol, roi=(x, y), slices=(2, 7), k=2, steps=2, seed=5)
    assert vr.timings["images"] == 5                      # all five slices in one batch
    assert vr.masks.shape == (2,) + hu.shape and vr.roi == (x - 64, y - 64, x + 64, y + 64)
    assert not vr.mean[:2].any() and not vr.mean[7:].any()
    assert not vr.mean[:, :, : x - 64].any() and not vr.mean[:, y + 64:].any()
    info = training_input(lidc.plan.manifest)
    for z in (2, 4, 6):   # each slice equals the crop, min-max mapped as the training crops were, run alone
        c = normalise_crop(vol.hu[z, y - 64:y + 64, x - 64:x + 64], info, hu=True)
        r = lidc.run(c, k=2, steps=2, seed=5)
        np.testing.assert_allclose(vr.mean[z, y - 64:y + 64, x - 64:x + 64], r.mean, atol=1e-5)
        np.testing.assert_array_equal(vr.masks[:, z, y - 64:y + 64, x - 64:x + 64], r.masks)
    # the nodule slice segments the nodule
    assert vr.consensus[4, y, x]


def test_3d_box_and_centre_with_slice(lidc, series):
    folder, _, _ = series
    vol = load_series(folder)
    a = segment_volume(lidc, vol, roi=(100, 70, 3, 140, 110, 6), k=2, steps=2, seed=1)
    assert a.slices == (3, 6) and a.roi == (100, 70, 140, 110)
    keep = np.zeros(vol.shape, bool)
    keep[3:6, 70:110, 100:140] = True
    assert not a.mean[~keep].any()
    b = segment_volume(lidc, vol, roi=(120, 90, 4), k=2, steps=2, seed=1)
    assert b.slices == (4, 5)


def test_nifti_volume_gives_the_same_result(lidc, series, tmp_path):
    nib = pytest.importorskip("nibabel")
    from msld_sdk.clinical.volume import save_nifti_outputs
    folder, _, _ = series
    vol = load_series(folder)
    nib.save(nib.Nifti1Image(vol.hu.transpose(2, 1, 0), vol.affine), str(tmp_path / "ct.nii.gz"))
    nv = load_nifti(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(nv.hu, vol.hu)
    np.testing.assert_allclose(nv.affine, vol.affine)
    a = segment_volume(lidc, vol, roi=(120, 90), slices=(3, 5), k=2, steps=2, seed=2)
    b = segment_volume(lidc, nv, roi=(120, 90), slices=(3, 5), k=2, steps=2, seed=2)
    np.testing.assert_array_equal(a.masks, b.masks)
    save_nifti_outputs(tmp_path / "out", b, nv)
    back = nib.load(str(tmp_path / "out" / "mean.nii.gz"))
    np.testing.assert_allclose(back.affine, nv.affine)
    np.testing.assert_allclose(np.asarray(back.dataobj).transpose(2, 1, 0), b.mean)
    masks = np.asarray(nib.load(str(tmp_path / "out" / "masks.nii.gz")).dataobj)
    np.testing.assert_array_equal(masks[..., 1].transpose(2, 1, 0).astype(bool), b.masks[1])


def test_bad_series_inputs(lidc, series, tmp_path):
    folder, hu, _ = series
    with pytest.raises(InputError, match="no DICOM"):
        load_series(tmp_path)
    with pytest.raises(InputError, match="slice range"):
        segment_volume(lidc, load_series(folder), roi=(120, 90), slices=(5, 20))
    with pytest.raises(InputError, match="Hounsfield"):
        segment_volume(Segmenter("polyp"), load_series(folder), roi=(120, 90), slices=(4, 5))
    write_series(tmp_path / "two", hu[:2])
    write_series(tmp_path / "two", hu[:2], prefix="B")          # a second series in the same folder
    with pytest.raises(InputError, match="2 series"):
        load_series(tmp_path / "two")


def test_cli_series_to_dicom_seg_round_trip(lidc, series, tmp_path):
    """Acceptance: msld segment SERIES_DIR --center ... --dicom-seg out.dcm; highdicom reads back
    frames equal to the result, and the SEG references the source instances."""
    hd = pytest.importorskip("highdicom")
    folder, hu, datasets = series
    x, y, _ = NODULE
    out = tmp_path / "seg" / "out.dcm"
    assert main(["segment", str(folder), "--center", str(x), str(y), "--slices", "2", "7", "--dicom-seg", str(out),
                 "-k", "3", "--steps", "2", "--seed", "11", "-o", str(tmp_path / "o"), "-q"]) == 0
    vr = segment_volume(lidc, load_series(folder), roi=(x, y), slices=(2, 7), k=3, steps=2, seed=11)
    saved = np.load(tmp_path / "o" / "result.npz")
    np.testing.assert_array_equal(saved["masks"], vr.masks)
    uids = [d.SOPInstanceUID for d in datasets]

    binary = hd.seg.segread(str(out))
    assert binary.SegmentationType == "BINARY" and len(binary.SegmentSequence) == 4
    px = binary.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3, 4],
                                              assert_missing_frames_are_empty=True)
    assert px.shape == hu.shape + (4,)
    np.testing.assert_array_equal(px[..., 0].astype(bool), vr.consensus)
    for i in range(3):
        np.testing.assert_array_equal(px[..., i + 1].astype(bool), vr.masks[i])
    frac = hd.seg.segread(str(tmp_path / "seg" / "out_mean.dcm"))
    assert frac.SegmentationType == "FRACTIONAL"
    pm = frac.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)[..., 0]
    np.testing.assert_allclose(pm, np.round(vr.mean * 255) / 255, atol=1e-6)
    for s in (binary, frac):
        ref = s.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == datasets[0].SeriesInstanceUID
        assert sorted(r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence) == sorted(uids)
        assert s.StudyInstanceUID == datasets[0].StudyInstanceUID and s.PatientID == "PHANTOM1"
        assert s.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    # every stored frame points at the source slice it belongs to
    for f in binary.PerFrameFunctionalGroupsSequence:
        src = f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = uids.index(src)
        assert 2 <= z < 7
    print(f"DICOM SEG round trip: {len(binary.PerFrameFunctionalGroupsSequence)} binary frames, "
          f"{len(frac.PerFrameFunctionalGroupsSequence)} fractional frames, all equal to the result")


def test_dicom_seg_inside_the_output_folder_is_refused(series, tmp_path, capsys):
    """-o is replaced whole when the run ends: a SEG written inside it was deleted after "written"."""
    folder, _, _ = series
    x, y, _ = NODULE
    out = tmp_path / "o"
    assert main(["segment", str(folder), "--center", str(x), str(y), "--slices", "2", "3", "--dicom-seg",
                 str(out / "seg.dcm"), "-k", "1", "--steps", "1", "-o", str(out), "-q"]) == 2
    assert "lies inside -o" in capsys.readouterr().err and not out.exists()


def test_nifti_headers_name_scanner_coordinates_in_mm(lidc, series, tmp_path):
    """sform and qform codes 1 (scanner) and mm units, so that viewers place the masks; the qform
    equals the sform for this (unsheared) series."""
    nib = pytest.importorskip("nibabel")
    from msld_sdk.clinical.volume import save_nifti_outputs
    folder, _, _ = series
    vol = load_series(folder)
    vr = segment_volume(lidc, vol, roi=NODULE[:2], slices=(3, 4), k=1, steps=1, seed=0)
    for f in save_nifti_outputs(tmp_path / "n", vr, vol):
        img = nib.load(str(f))
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert img.header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(img.get_qform(), vol.affine, atol=1e-4)
        np.testing.assert_allclose(img.get_sform(), vol.affine, atol=1e-6)


def test_plan_with_a_pixel_spacing_cuts_the_same_millimetres(tiny_crop_plan, series, tmp_path):
    """A plan whose crops were 32 px at 1.4 mm: on this 0.7 mm series the window is 64 px."""
    import shutil

    from msld_export.training.training_input import TRAINING_INPUTS, set_training_input
    p = tmp_path / "mm.plan"
    shutil.copy(tiny_crop_plan, p)
    set_training_input(p, "lidc", why="test", record=dict(TRAINING_INPUTS["lidc"], crop_size=[32, 32],
                                                           pixel_spacing_mm=[1.4, 1.4]))
    vr = segment_volume(Segmenter(p), load_series(series[0]), roi=(120, 90), slices=(4, 5), k=1, steps=1, seed=0)
    assert vr.roi == (120 - 32, 90 - 32, 120 + 32, 90 + 32)


@pytest.mark.parametrize("module,extra", [("nibabel", "volume"), ("highdicom", "dicom"), ("ray", "ray")])
def test_missing_optional_dependency_names_the_extra(monkeypatch, module, extra):
    import sys

    from msld_sdk.extras import MissingExtraError, require
    monkeypatch.setitem(sys.modules, module, None)      # import now raises ImportError
    with pytest.raises(MissingExtraError, match=rf"msld_sdk\[{extra}\]"):
        require(module, "this feature")


def test_volume_result_records_its_settings_and_a_missing_nifti_is_logged(lidc, series, tmp_path, monkeypatch,
                                                                        caplog):
    """VolumeResult names the views, threshold and grid it was made with (as SegmentationResult);
    `msld segment`'s NIfTI "if installed" says so in the log when nibabel is absent."""
    import importlib.util
    import logging

    from msld_sdk.outputs import segment_and_write
    folder, _, _ = series
    x, y, _ = NODULE
    vr = segment_volume(lidc, load_series(folder), roi=(x, y), slices=(4, 5), k=2, steps=2, seed=1, threshold=0.7)
    assert (vr.threshold, vr.views, vr.solver, vr.timesteps) == (0.7, 1, lidc.defaults["solver"], None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nibabel" else find_spec(name, *a))
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        w = segment_and_write(lidc, folder, tmp_path / "o", roi=(x, y), slices=(4, 5), k=1, steps=1, seed=0,
                              nifti="if_installed")
    assert not any(f.endswith(".nii.gz") for f in w.files) and "result.npz" in w.files
    assert "no NIfTI outputs: nibabel is not installed" in caplog.text



def test_a_tilted_series_keeps_its_shear_in_the_sform_only_and_says_so(lidc, tmp_path, caplog):
    """A gantry tilt (each slice shifted along y as z grows) is a regular, sheared grid: the sform
    holds it exactly, a qform cannot (left unset, code 0), and a warning names the consequence."""
    import logging

    import pydicom
    nib = pytest.importorskip("nibabel")
    from msld_sdk.clinical.volume import save_nifti_outputs
    folder = tmp_path / "tilt"
    write_series(folder, phantom(n_slices=4, nodule=NODULE))
    for f in folder.iterdir():
        ds = pydicom.dcmread(str(f))
        p = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], ORIGIN[1] + 0.5 * (p[2] - ORIGIN[2]), p[2]]   # ~11 degrees
        ds.save_as(str(f), enforce_file_format=True)
    vol = load_series(folder)
    assert vol.regular
    vr = segment_volume(lidc, vol, roi=NODULE[:2], slices=(1, 2), k=1, steps=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        files = save_nifti_outputs(tmp_path / "n", vr, vol)
    assert "tilted (sheared) slice geometry" in caplog.text
    img = nib.load(str(files[0]))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 0
    np.testing.assert_allclose(img.get_sform(), vol.affine, atol=1e-6)
