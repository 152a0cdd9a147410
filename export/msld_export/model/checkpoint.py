"""Checkpoints as safetensors (never pickle): weights plus the model config in the metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .config import ModelConfig
from .networks import MedSegLatDiff


def save_checkpoint(model: MedSegLatDiff, path: str | Path, **info) -> None:
    """Write all weights of ``model``; ``info`` (json-able) is kept beside the config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.cfg.to_dict()), "info": json.dumps(info)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a stopped run never leaves a half-written checkpoint


def read_metadata(path: str | Path) -> tuple[ModelConfig, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: not an msld checkpoint (no 'config' in safetensors metadata)")
    return ModelConfig.from_dict(json.loads(meta["config"])), json.loads(meta.get("info", "{}"))


def load_checkpoint(path: str | Path) -> tuple[MedSegLatDiff, dict]:
    """Model (eval mode) and the info dict saved with it."""
    cfg, info = read_metadata(path)
    model = MedSegLatDiff(cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), info


def random_model(cfg: ModelConfig, seed: int = 0) -> MedSegLatDiff:
    """Untrained model with reproducible weights (tests, and the stand-in default plan)."""
    torch.manual_seed(seed)
    return MedSegLatDiff(cfg).eval()
