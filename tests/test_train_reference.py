"""Smoke test of the reference-architecture trainer (export/msld_export/training/train_reference.py).

A narrowed copy of the fixture's config (../shared/reference/lidc/config.yaml) trains a few steps
on a handful of real LIDC slices; the run stops on its time budget, resumes, refuses to start over
a run without --resume, and its last.ckpt imports (``msld import``) into a plan that segments.
Skipped when the LIDC data or the fixture config is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from msld_export.reference.checkpoint_reader import read_checkpoint, state_dict_of
from msld_export.reference.importer import import_reference
from msld_export.training.data import default_data_root
from msld_export.training.train_reference import main as train_main
from msld_sdk import Segmenter

ROOT = default_data_root()
FIXTURE = next((p for p in (Path(__file__).parents[1].parent / "shared", ROOT.parent)
                if (p / "reference" / "lidc" / "config.yaml").is_file()),
               ROOT.parent) / "reference" / "lidc" / "config.yaml"
pytestmark = [pytest.mark.skipif(not (ROOT / "lidc").is_dir(), reason=f"LIDC data not found under {ROOT}"),
              pytest.mark.skipif(not FIXTURE.is_file(), reason=f"{FIXTURE} is absent")]

FAST = ["--limit", "6", "--val-limit", "2", "--ae-steps", "2", "--steps", "2", "--batch-ae", "2", "--batch", "2",
        "--warmup", "1", "--ae-crop", "32", "--mask-mult", "1,1,1", "--log-every", "1", "--threads", "1"]


def _tiny_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(FIXTURE.read_text())
    net = cfg["model"]["net"]
    net["denoise_net"].update(channel_multipliers=[1, 1], attention_levels=[1])
    net["image_embedder"].update(channel_multipliers=[1, 1, 1])
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_resume_import_segment(tmp_path):
    torch.set_num_threads(1)
    cfg, out = _tiny_config(tmp_path), tmp_path / "run"
    base = ["--config", str(cfg), "--data", str(ROOT), "--out", str(out)] + FAST
    # a zero budget stops at once but still leaves a resumable state and an importable checkpoint
    assert train_main(base + ["--minutes", "0"]) == 0
    first = torch.load(out / "state.pt", weights_only=False)
    assert first["step1"] == 0 and first["step2"] == 0
    with pytest.raises(SystemExit):        # an existing run is never overwritten silently
        train_main(base)
    assert train_main(base + ["--resume"]) == 0
    st = torch.load(out / "state.pt", weights_only=False)
    assert st["step1"] == 2 and st["step2"] == 2 and st["history"][-1]["finished"] == 1
    assert st["ema"]["num_updates"] == 2 and np.isfinite(st["history"][-1]["val_eps_mse_ema"])
    assert "stage 2 step 2 loss" in (out / "train.log").read_text()

    with read_checkpoint(out / "last.ckpt") as ck:      # plain tensors, the reference's names
        sd = state_dict_of(ck)
        assert ck.tensor(sd["model_ema.num_updates"], "n").reshape(-1)[0] == 2
        assert {k.split(".")[1] for k in sd if k.startswith("net.")} == {
            "denoise_net", "image_embedder", "autoencoder_module", "sampler"}
        assert set(ck.globals_seen) <= {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                                   "torch.FloatStorage", "torch.IntStorage", "torch.LongStorage"}

    plan = tmp_path / "ref.plan"
    m = import_reference(out / "last.ckpt", out / "config.yaml", plan)
    assert m["model"]["weights"] == "ema" and m["provenance"]["training"]["global_step"] == 2
    img = (np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8)
    res = Segmenter(plan, backend="onnxruntime", threads=1).run(img, k=2, steps=2, seed=0)
    assert res.masks.shape[-2:] == (128, 128)
