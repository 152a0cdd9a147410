"""Regions of interest: a plan-sized crop is cut, segmented and pasted back at full size."""
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from msld_sdk import InputError, Segmenter
from msld_sdk.cli import main
from msld_sdk.evaluation.metrics import dice

SAMPLES = ROOT / "msld_sdk" / "samples"   # shipped LIDC crops (128 x 128, nodule at the centre)


@pytest.fixture(scope="module")
def lidc():
    return Segmenter("lidc")


def _ct_like_canvas(rng, size=512):
    """A CT-like 512 x 512 8-bit background: another LIDC slice upsampled, with noise."""
    bg = Image.open(SAMPLES / "lidc_0997_n2_s2" / "image.png").resize((size, size))
    a = np.asarray(bg, np.float32) + rng.normal(0, 6, (size, size))
    return np.clip(a, 0, 255).astype(np.uint8)


def test_crop_in_canvas_with_center_gives_the_crops_masks(lidc, rng):
    """Acceptance: an LIDC crop at a random place in a 512 x 512 canvas, --center at the nodule."""
    crop = np.asarray(Image.open(SAMPLES / "lidc_0974_n0_s2" / "image.png"))
    canvas = _ct_like_canvas(rng)
    y0, x0 = (int(v) for v in rng.integers(0, 512 - 128, 2))
    canvas[y0:y0 + 128, x0:x0 + 128] = crop
    alone = lidc.run(crop, k=4, steps=5, seed=7)
    full = lidc.run(canvas, k=4, steps=5, seed=7, roi=(x0 + 64, y0 + 64))
    assert full.masks.shape == (4, 512, 512) and full.roi == (x0, y0, x0 + 128, y0 + 128)
    assert alone.consensus.any(), "the nodule crop should give a non-empty consensus"
    inside = (slice(y0, y0 + 128), slice(x0, x0 + 128))
    dices = [dice(full.masks[i][inside], alone.masks[i]) for i in range(4)] + \
            [dice(full.consensus[inside], alone.consensus)]
    print("canvas --center Dice per hypothesis and consensus:", [round(d, 4) for d in dices])
    assert min(dices) >= 0.99
    np.testing.assert_allclose(full.mean[inside], alone.mean, atol=1e-5)
    outside = np.ones((512, 512), bool)
    outside[inside] = False
    for plane in (full.masks.any(0), full.mean, full.confidence, full.consensus, full.probs.any(0)):
        assert not plane[outside].any()


def test_whole_large_image_warns_once_naming_roi(lidc, caplog):
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        lidc.run(np.zeros((512, 512), np.uint8), k=1, steps=1, seed=0)
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "roi" in warns[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        lidc.run(np.zeros((128, 128), np.uint8), k=1, steps=1, seed=0)                      # crop-sized
        lidc.run(np.zeros((512, 512), np.uint8), k=1, steps=1, seed=0, roi=(256, 256))      # with a roi
        Segmenter("polyp").run(np.zeros((512, 600, 3), np.uint8), k=1, steps=1, seed=0)  # whole-image plan
    assert not caplog.records


def test_center_at_the_edge_pads_with_the_plans_fill(tiny_crop_plan, rng):
    seg = Segmenter(tiny_crop_plan)
    img = rng.random((50, 70), dtype=np.float32)
    r = seg.run(img, k=2, steps=3, seed=1, roi=(3, 45))           # window x -13..19, y 29..61
    padded = np.zeros((32, 32), np.float32)                       # pad_value 0 (air), then per-crop min-max
    padded[:21, 13:] = img[29:50, 0:19]
    padded = (padded - padded.min()) / (padded.max() - padded.min())
    ref = seg.run(padded, k=2, steps=3, seed=1)
    assert r.roi == (0, 29, 19, 50) and r.mean.shape == (50, 70)
    np.testing.assert_allclose(r.mean[29:50, 0:19], ref.mean[:21, 13:], atol=1e-5)
    assert r.mean[:29].max() == 0 and r.mean[:, 19:].max() == 0


def test_box_keeps_outputs_inside_the_box(tiny_crop_plan, rng):
    seg = Segmenter(tiny_crop_plan)
    img = rng.random((64, 64), dtype=np.float32)
    r = seg.run([img, img], k=2, steps=2, seed=3, roi=[(10, 12, 20, 30), (0, 0, 64, 64)])
    assert r[0].roi == (10, 12, 20, 30)
    keep = np.zeros((64, 64), bool)
    keep[12:30, 10:20] = True
    assert not r[0].probs[:, ~keep].any() and r[0].probs[:, keep].any()
    # a box larger than the crop: the whole box is the window (resized to the model's input)
    ref = seg.run((img - img.min()) / (img.max() - img.min()), k=2, steps=2, seed=3)
    np.testing.assert_allclose(r[1].mean, ref.mean, atol=1e-5)


@pytest.mark.parametrize("roi", [(100, 5), (5, 5, 5, 9), (1, 2, 3), ("a", 1), (np.nan, 3)])
def test_bad_roi_raises(tiny_crop_plan, roi):
    with pytest.raises(InputError, match="roi"):
        Segmenter(tiny_crop_plan).run(np.zeros((20, 20), np.float32), k=1, steps=1, roi=roi)


def test_cli_center_and_roi(tiny_crop_plan, tmp_path, rng):
    img = (rng.random((60, 80)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "slice.png")
    for opt in (["--center", "40", "30"], ["--roi", "30", "20", "50", "40"]):
        out = tmp_path / opt[0][2:]
        assert main(["segment", str(tmp_path / "slice.png"), "--plan", str(tiny_crop_plan), "-k", "2",
                     "--steps", "2", "--seed", "0", "-o", str(out), "-q", *opt]) == 0
        mean = np.asarray(Image.open(out / "mean.png"))
        assert mean.shape == (60, 80)
        r = Segmenter(tiny_crop_plan).run(img, k=2, steps=2, seed=0, roi=tuple(float(v) for v in opt[1:]))
        np.testing.assert_array_equal(mean, (r.mean * 255 + 0.5).astype(np.uint8))


def test_plans_record_their_training_input():
    """Shipped plans carry the record (added without re-export); export writes it for new plans."""
    from msld_export.model.config import tiny_config
    from msld_export.plan_writing.export_plan import manifest_for
    from msld_sdk.plan import Plan
    lidc = Plan.open(ROOT / "msld_sdk" / "models" / "lidc.plan").manifest
    assert lidc["training_input"]["kind"] == "crop" and lidc["training_input"]["crop_size"] == [128, 128]
    assert lidc["training_input"]["intensity"]["kind"] == "minmax"
    assert "min 0 and max 255" in lidc["provenance"]["training_input_evidence"]
    assert Plan.open(ROOT / "msld_sdk" / "models" / "polyp.plan").manifest["training_input"]["kind"] == "whole_image"
    assert manifest_for(tiny_config(name="lidc-small"), {})["training_input"]["kind"] == "crop"
    assert "training_input" not in manifest_for(tiny_config(), {})
