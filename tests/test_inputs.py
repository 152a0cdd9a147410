"""Image input contract: accepted forms, conversions, and typed errors for bad inputs."""
import logging

import numpy as np
import pytest
from PIL import Image

from msld_sdk import InputError, Segmenter
from msld_sdk.image_input import convert_channels, load_image


@pytest.fixture(scope="module")
def seg(tiny_plan):
    return Segmenter(tiny_plan)


def test_forms_agree(seg, tmp_path, rng):
    u8 = rng.integers(0, 256, (45, 37), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", u8)
    runs = [seg.run(x, k=2, steps=3, seed=5) for x in
            (u8, u8.astype(np.float32) / 255, Image.fromarray(u8), tmp_path / "a.png", str(tmp_path / "a.npy"),
             u8[:, :, None], (u8.astype(np.uint16) * 257))]
    for r in runs:
        assert r.masks.shape == (2, 45, 37)
        np.testing.assert_allclose(r.mean, runs[0].mean, atol=1e-5)


def test_rgb_to_gray_model_uses_luminance(seg, rng):
    g = rng.random((32, 32), dtype=np.float32)
    rgb = np.repeat(g[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.ones((32, 32, 1), np.float32)], axis=2)
    a, b, c = (seg.run(x, k=2, steps=3, seed=1) for x in (g, rgb, rgba))
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
    np.testing.assert_allclose(a.mean, c.mean, atol=1e-5)
    px = np.array([[[1.0, 0.0, 0.0]]], np.float32)
    assert convert_channels(px, 1)[0, 0, 0] == pytest.approx(0.299)


def test_gray_to_rgb_model(tiny_rgb_plan, rng):
    seg = Segmenter(tiny_rgb_plan)
    g = rng.random((20, 30), dtype=np.float32)
    a = seg.run(g, k=2, steps=3, seed=1)
    b = seg.run(np.repeat(g[:, :, None], 3, axis=2), k=2, steps=3, seed=1)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
    assert a.masks.shape == (2, 20, 30)


def test_float_out_of_range_rescaled_with_warning(caplog):
    a = np.linspace(-1000, 400, 64, dtype=np.float32).reshape(8, 8)  # e.g. CT in Hounsfield units
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        x = load_image(a)
    assert "outside [0, 1]" in caplog.text
    assert x.min() == 0 and x.max() == 1


@pytest.mark.parametrize("bad,msg", [
    (np.full((8, 8), np.nan, np.float32), "NaN or infinite"),
    (np.array([[0.1, np.inf], [0.2, 0.3]], np.float32), "NaN or infinite"),
    (np.zeros((0, 10), np.uint8), "at least 2"),
    (np.zeros((1, 1), np.uint8), "at least 2"),
    (np.zeros((4, 4, 4, 4), np.uint8), "rank 4"),
    (np.zeros(10, np.uint8), "rank 1"),
    (np.zeros((8, 8, 5), np.uint8), "5 channels"),
    (np.zeros((5, 64, 64), np.float32), "64 channels .* A 3-D volume is several images"),
    (np.zeros((8, 8), np.complex64), "dtype"),
    ("no/such/file.png", "not found"),
    (12345, "unsupported image type"),
])
def test_bad_images_raise_input_error(seg, bad, msg):
    with pytest.raises(InputError, match=msg):
        seg.run(bad, k=1, steps=1, seed=0)


def test_multi_frame_files_are_refused_not_cut_to_their_first_frame(seg, tmp_path):
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name in ("pages.tif", "anim.gif"):
        with pytest.raises(InputError, match=f"{name}: holds 3 frames"):
            seg.run(tmp_path / name, k=1, steps=1, seed=0)
    frames[1].save(tmp_path / "one.tif")
    assert seg.run(tmp_path / "one.tif", k=1, steps=1, seed=0).masks.shape == (1, 16, 16)


def test_float64_beyond_float32_range_is_finite_and_rescaled(seg, caplog):
    """1e39 is a finite float64 but no float32: the range check runs in the input's precision,
    so the image is rescaled like any out-of-range float image instead of called NaN/infinite."""
    img = np.linspace(0, 1, 64 * 64).reshape(64, 64) * 1e39
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        got = load_image(img)
    assert got.dtype == np.float32 and np.isfinite(got).all() and got.min() == 0 and got.max() == 1
    np.testing.assert_allclose(got[..., 0], (img / 1e39).astype(np.float32), atol=1e-6)
    assert any("rescaling by min/max" in r.getMessage() for r in caplog.records)


def test_float16_images_are_rescaled_in_float32_as_before():
    img = np.linspace(-3, 5, 64 * 64, dtype=np.float32).reshape(64, 64).astype(np.float16)
    want = (img.astype(np.float32) - np.float32(-3)) / np.float32(8)
    np.testing.assert_array_equal(load_image(img)[..., 0], want.astype(np.float32))


@pytest.mark.parametrize("threads", [-1, 0, 1.5, "2", True])
def test_bad_thread_counts_are_refused(tiny_plan, threads):
    with pytest.raises(InputError, match="threads must be a positive whole number"):
        Segmenter(tiny_plan, threads=threads)


def test_unreadable_file(seg, tmp_path):
    f = tmp_path / "broken.png"
    f.write_bytes(b"not really a png")
    with pytest.raises(InputError, match="broken.png.*cannot be read"):
        seg.run(f, k=1, steps=1)


@pytest.mark.parametrize("kw,msg", [
    ({"k": 0}, "k must be"), ({"k": 33}, "k must be"), ({"k": 2.5}, "k must be"),
    ({"steps": 0}, "steps must be"), ({"steps": 1001}, "steps must be"),
    ({"eta": -0.1}, "eta"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"threshold": 1.5}, "threshold"),
])
def test_bad_arguments(seg, kw, msg):
    with pytest.raises(InputError, match=msg):
        seg.run(np.zeros((8, 8), np.float32), **kw)


def test_empty_batch(seg):
    with pytest.raises(InputError, match="empty"):
        seg.run([])


def _write_dicom(path, pixels: np.ndarray, slope=1.0, intercept=0.0, window=None, photometric="MONOCHROME2"):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_dicom_rescale_and_window(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 40          # 0 .. 2520
    f = tmp_path / "ct.dcm"
    _write_dicom(f, stored, slope=1.0, intercept=-1024.0, window=(-600, 1200))  # lung window in HU
    got = load_image(f)[:, :, 0]
    hu = stored.astype(np.float64) - 1024
    want = np.clip((hu - (-600 - 600)) / 1200, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    g = tmp_path / "noext"
    _write_dicom(g, stored, photometric="MONOCHROME1")  # found by its DICM magic, inverted
    got = load_image(g)[:, :, 0]
    np.testing.assert_allclose(got, 1 - stored / stored.max(), atol=1e-6)


def test_damaged_dicom(tmp_path, seg):
    f = tmp_path / "bad.dcm"
    f.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02garbage")
    with pytest.raises(InputError, match="bad.dcm.*DICOM"):
        seg.run(f, k=1, steps=1)


def test_result_records_its_threshold(seg):
    img = np.random.default_rng(4).random((32, 32), dtype=np.float32)
    r = seg.run(img, k=2, steps=2, seed=1, threshold=0.25)
    assert r.threshold == 0.25 and seg.run(img, k=2, steps=2, seed=1).threshold == seg.defaults.get("threshold", 0.5)
    np.testing.assert_array_equal(r.masks, r.probs > 0.25)
