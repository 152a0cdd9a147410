"""Smoke test of the training recipe (export/msld_export/training/train.py) and the data splits (export/msld_export/training/data.py).

Uses the real data under ../shared/data (or $MSLD_DATA); skipped when it is absent.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from msld_export.model.checkpoint import load_checkpoint
from msld_export.model.config import tiny_config
from msld_sdk.evaluation.datasets import CVC_GUARD_FRAMES
from msld_export.training.data import (cvc_split, default_data_root, dihedral, kvasir_split, lidc_split, load_split,
                               random_affine)
from msld_export.training.train import main as train_main

ROOT = default_data_root()
needs_lidc = pytest.mark.skipif(not (ROOT / "lidc").is_dir(), reason=f"LIDC data not found under {ROOT}")
needs_polyp = pytest.mark.skipif(not ((ROOT / "cvc-clinicdb").is_dir() and (ROOT / "kvasir-seg").is_dir()),
                                 reason=f"CVC-ClinicDB / Kvasir-SEG data not found under {ROOT}")

FAST = ["--iters1", "4", "--iters2", "4", "--batch1", "4", "--batch-vae", "2", "--batch2", "4",
        "--log-every", "2", "--eval-images", "2", "--eval-k", "2", "--eval-steps", "2", "--ae-crop", "16",
        "--limit", "8", "--nice", "0", "--threads", "1", "--quiet"]


def _tiny(tmp_path, name, channels=1, prediction_type=None):
    cfg = tiny_config(name=name, image_channels=channels, image_mean=(0.5,) * channels, image_std=(0.5,) * channels)
    d = cfg.to_dict()
    if prediction_type:
        d["prediction_type"] = prediction_type
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(d))
    return p


@needs_lidc
def test_train_both_stages_lidc(tmp_path):
    torch.set_num_threads(1)
    cfg = _tiny(tmp_path, "lidc-tiny")
    out = tmp_path / "run"
    # a run stopped by the time budget at once leaves a resumable checkpoint ...
    assert train_main(["--config", str(cfg), "--data", str(ROOT), "--out", str(out), "--max-minutes", "0"] + FAST) == 3
    info = load_checkpoint(out / "last.safetensors")[1]
    assert info["stage"] == 1 and info["step"] == 0 and not info["stage1_done"]
    # ... and the same command without the budget finishes both stages
    assert train_main(["--config", str(cfg), "--data", str(ROOT), "--out", str(out)] + FAST) == 0
    model, info = load_checkpoint(out / "model.safetensors")
    assert info["stage"] == 2 and info["complete"] and info["step"] == 4
    assert model.cfg.image_size == 32 and model.cfg.mask_latent_scale != 1.0
    assert math.isfinite(model.cfg.mask_latent_scale) and model.cfg.mask_latent_scale > 0
    log = json.loads((out / "log.json").read_text())
    assert math.isfinite(log["stage2"]["final_loss"])
    assert all(math.isfinite(v) for k, v in log["stage1"]["final"].items())
    assert log["stage1"]["iters"] == 4 and log["stage2"]["iters"] == 4
    assert 0.0 <= log["stage1"]["val_mask_ae"]["dice_nonempty"] <= 1.0
    assert all(math.isfinite(v["ratio"]) for v in log["stage2"]["val_cond_sensitivity"].values())
    # the exported parts run on the loaded weights
    with torch.no_grad():
        lat = model.image_vae.encode(torch.zeros(1, 1, 32, 32))[0]
        eps = model.denoiser(torch.zeros(1, 4, 8, 8), torch.tensor([10]), lat)
    assert lat.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
    # a finished run started again does nothing more
    assert train_main(["--config", str(cfg), "--data", str(ROOT), "--out", str(out)] + FAST) == 0
    assert load_checkpoint(out / "model.safetensors")[1]["step"] == 4


@needs_polyp
def test_train_polyp_rgb(tmp_path):
    torch.set_num_threads(1)
    cfg = _tiny(tmp_path, "polyp-tiny", channels=3)
    out = tmp_path / "run"
    assert train_main(["--config", str(cfg), "--data", str(ROOT), "--out", str(out)] + FAST + ["--limit", "4", "--eval-images", "0"]) == 0
    model, info = load_checkpoint(out / "model.safetensors")
    assert model.cfg.image_channels == 3 and info["complete"]


@needs_polyp
def test_train_x0_prediction_with_tuned_encoder(tmp_path):
    """The shipped recipe: clean-latent prediction, image encoder trained in stage 2 (EMA saved)."""
    torch.set_num_threads(1)
    cfg_path = _tiny(tmp_path, "polyp-tiny", channels=3, prediction_type="sample")
    out = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--data", str(ROOT), "--out", str(out), "--stage", "1"]
                      + FAST + ["--limit", "4"]) == 0
    stage1, _ = load_checkpoint(out / "stage1.safetensors")
    assert train_main(["--config", str(cfg_path), "--data", str(ROOT), "--out", str(out), "--tune-encoder", "true"]
                      + FAST + ["--limit", "4", "--eval-images", "0"]) == 0
    model, info = load_checkpoint(out / "model.safetensors")
    assert info["complete"] and model.cfg.prediction_type == "sample"
    before, after = stage1.image_vae.enc.state_dict(), model.image_vae.enc.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)          # the encoder was trained
    assert all(torch.equal(stage1.mask_ae.state_dict()[k], v) for k, v in model.mask_ae.state_dict().items())
    st = load_checkpoint(out / "last.safetensors")[0].image_vae.enc.state_dict()
    assert any(not torch.equal(st[k], after[k]) for k in st)                  # model = EMA, not the live weights


@needs_polyp
def test_stage2_fine_tune_from_finished_model_with_affine(tmp_path):
    """--init CKPT --stage 2: the checkpoint's autoencoders and latent scale are kept (stage 1
    does not run again), the denoiser goes on training with zoom/rotation/shift augmentation."""
    torch.set_num_threads(1)
    cfg_path = _tiny(tmp_path, "polyp-tiny", channels=3, prediction_type="sample")
    first = tmp_path / "first"
    assert train_main(["--config", str(cfg_path), "--data", str(ROOT), "--out", str(first), "--tune-encoder", "true"]
                      + FAST + ["--limit", "4", "--eval-images", "0"]) == 0
    base, _ = load_checkpoint(first / "model.safetensors")
    out = tmp_path / "fine"
    assert train_main(["--config", str(cfg_path), "--data", str(ROOT), "--out", str(out), "--stage", "2",
                       "--init", str(first / "model.safetensors"), "--tune-encoder", "true",
                       "--affine-prob", "1", "--jitter-strength", "2"] + FAST + ["--limit", "4", "--eval-images", "0"]) == 0
    model, info = load_checkpoint(out / "model.safetensors")
    assert info["complete"] and info["step"] == 4
    assert model.cfg.mask_latent_scale == base.cfg.mask_latent_scale != 1.0
    assert all(torch.equal(base.mask_ae.state_dict()[k], v) for k, v in model.mask_ae.state_dict().items())
    b, a = base.denoiser.state_dict(), model.denoiser.state_dict()
    assert any(not torch.equal(b[k], a[k]) for k in b)
    log = json.loads((out / "log.json").read_text())
    assert "stage1" not in log and log["options"]["affine_prob"] == 1.0


def test_random_affine_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    m = torch.zeros(6, 1, 32, 32)
    m[:, :, 10:20, 12:24] = 1.0
    img = torch.cat([m, 1 - m, torch.full_like(m, 0.5)], dim=1)   # channel 0 is the mask itself
    img_a, m_a = random_affine(img, m, rng)
    assert torch.equal((img_a[:, :1] > 0.5).float(), m_a)          # same warp for both
    assert set(torch.unique(m_a).tolist()) <= {0.0, 1.0} and not torch.equal(m_a, m)
    assert torch.allclose(img_a[:, 2], torch.full_like(img_a[:, 2], 0.5))
    same_img, same_m = random_affine(img, m, rng, scale=(1.0, 1.0), max_rotation_deg=0.0, max_shift=0.0)
    assert torch.allclose(same_img, img, atol=1e-6) and torch.equal(same_m, m)   # no transform = identity


@needs_lidc
def test_lidc_split_by_patient():
    s = lidc_split(ROOT)
    assert s["train"] and s["val"]
    assert not set(s["train"]) & set(s["val"])
    assert sorted(s["train"] + s["val"]) == s["train"] + s["val"]   # val = the last patients
    assert abs(len(s["val"]) / (len(s["train"]) + len(s["val"])) - 0.15) < 0.01
    tr = load_split("lidc", ROOT, "train", 32, limit=20)
    va = load_split("lidc", ROOT, "val", 32, limit=20)
    assert set(tr.groups) <= set(s["train"]) and set(va.groups) <= set(s["val"])
    assert tr.masks.shape[1:] == (4, 32, 32) and tr.images.shape[1:] == (1, 32, 32)
    item = tr[0]
    assert item["image"].dtype == np.float32 and 0 <= item["image"].min() and item["image"].max() <= 1
    assert set(np.unique(item["mask"])) <= {0.0, 1.0}


@needs_polyp
def test_cvc_split_contiguous_and_kvasir_disjoint():
    s = cvc_split(ROOT)
    tr, guard, va = s["train"], s["guard"], s["val"]
    assert tr == list(range(tr[0], tr[-1] + 1)) and va == list(range(va[0], va[-1] + 1))
    assert guard == list(range(tr[-1] + 1, va[0])) and len(guard) == CVC_GUARD_FRAMES
    assert 0.08 < len(va) / (len(tr) + len(va)) < 0.22
    k = kvasir_split(ROOT)
    assert not set(k["train"]) & set(k["val"]) and len(k["train"]) == 700
    d = load_split("polyp", ROOT, "val", 32, limit=3)
    assert d.images.shape == (6, 3, 32, 32) and d.masks.shape == (6, 1, 32, 32)


@needs_polyp
def test_cvc_cross_validation_folds_are_sequence_safe():
    """Over 5 folds every frame is validated exactly once; within a fold no training frame is
    closer than the guard band to a validation frame, so a sequence of up to 26 frames cannot
    be on both sides even if an edge fell inside it."""
    from msld_sdk.evaluation.datasets import cvc_frames, parse_fold

    frames = cvc_frames(ROOT)
    seen = []
    for f in range(1, 6):
        s = cvc_split(ROOT, f"{f}/5")
        va, tr = s["val"], s["train"]
        assert va == list(range(va[0], va[-1] + 1)) and sorted(tr + s["guard"] + va) == frames
        assert min(abs(t - v) for t in tr for v in (va[0], va[-1])) > CVC_GUARD_FRAMES
        seen += va
    assert sorted(seen) == frames
    d = load_split("polyp", ROOT, "val", 32, limit=3, cvc_fold="2/5")
    assert [i for i in d.ids if i.startswith("cvc/")] == [f"cvc/{f}" for f in cvc_split(ROOT, "2/5")["val"][:3]]
    for bad in ("0/5", "6/5", "1/1", "two"):
        with pytest.raises(ValueError, match="fold"):
            parse_fold(bad)
    with pytest.raises(ValueError, match="cvc_fold"):
        load_split("lidc", ROOT, "val", 32, cvc_fold="1/5")


def test_dihedral_augmentation_consistent():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    for t in range(8):
        y = dihedral(x, [t, t])
        assert torch.equal(y[0], y[1] - 16)          # same transform on every sample
    assert len({tuple(dihedral(x[:1], [t]).flatten().tolist()) for t in range(8)}) == 8


def test_recenter_mask_latents_is_exact_inside():
    from msld_export.model.checkpoint import random_model
    from msld_export.training.train import empty_mask_latent, recenter_mask_latents
    torch.set_num_threads(1)
    model = random_model(tiny_config(image_size=64), seed=1)
    with torch.no_grad():
        model.mask_ae.enc.head.bias += torch.tensor([1.0, -2.0, 0.5, 3.0])  # a large background offset
        m = torch.zeros(2, 1, 64, 64)
        m[:, :, 28:36, 26:34] = 1
        before = model.mask_ae.dec.stem(model.mask_ae.encode(m))
        b = recenter_mask_latents(model)
        after = model.mask_ae.dec.stem(model.mask_ae.encode(m))
    assert max(abs(v) for v in b) > 0.4
    assert empty_mask_latent(model).abs().max() < 1e-5
    # the decoder's first layer sees the same input except in the latent's 1-pixel border ring
    # (zero padding); on trained LIDC weights val reconstruction Dice went 0.9927 -> 0.9924
    assert torch.allclose(before[..., 1:-1, 1:-1], after[..., 1:-1, 1:-1], atol=1e-4)
