"""The Ray path writes DICOM SEG for a DICOM series too (seg.dcm + seg_mean.dcm per item)."""
import numpy as np
import pytest

from ct_series import phantom, write_series


@pytest.mark.parametrize("use_ray", [False, True])
def test_ray_items_write_dicom_seg(tmp_path, use_ray):
    hd = pytest.importorskip("highdicom")
    if use_ray:
        pytest.importorskip("ray")
    from msld_sdk.clinical.batch_ray import run_items
    ds = write_series(tmp_path / "CT1", phantom(n_slices=6))
    s = run_items([tmp_path / "CT1"], tmp_path / "out", plan="lidc", k=2, steps=2, seed=3, roi=(120, 90),
                  slices=(3, 5), use_ray=use_ray, actors=1, dicom_seg=True)
    assert s["done"] == ["CT1"]
    r = np.load(tmp_path / "out" / "CT1" / "result.npz")
    uids = [d.SOPInstanceUID for d in ds]
    b = hd.seg.segread(str(tmp_path / "out" / "CT1" / "seg.dcm"))
    px = b.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(px[..., 0].astype(bool), r["consensus"])
    np.testing.assert_array_equal(np.moveaxis(px[..., 1:], -1, 0).astype(bool), r["masks"])
    assert (tmp_path / "out" / "CT1" / "seg_mean.dcm").is_file()
