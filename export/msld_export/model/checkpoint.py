"""Checkpoints as safetensors (never pickle): weights plus the model config in the metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from msld_sdk.errors import CheckpointError

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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        zip_file = f.read(2) == b"PK"
    if zip_file:   # torch.save's format (what the reference's Lightning writes), or an msld plan
        raise CheckpointError(f"{path}: a zip file (a PyTorch/Lightning checkpoint or an msld plan), not a "
                              "safetensors checkpoint of msld_export.training.train; a run of the MedSegLatDiff "
                              "reference code is deployed with msld import CKPT --config .hydra/config.yaml --out "
                              "P.plan, and a plan is used as it is")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:   # safetensors raises its own SafetensorError (and OSError) on damage
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e}); "
                              "a truncated copy? copy it again") from e
    if "config" not in meta:
        raise CheckpointError(f"{path}: not an msld checkpoint (no 'config' in its safetensors metadata); "
                              "msld export takes checkpoints written by msld_export.training.train")
    try:
        return ModelConfig.from_dict(json.loads(meta["config"])), json.loads(meta.get("info", "{}"))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: its model config metadata cannot be read ({type(e).__name__}: {e})") from e


def load_checkpoint(path: str | Path) -> tuple[MedSegLatDiff, dict]:
    """Model (eval mode) and the info dict saved with it."""
    cfg, info = read_metadata(path)
    model = MedSegLatDiff(cfg)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as e:   # missing/unexpected tensors, wrong shapes, a damaged tensor section
        raise CheckpointError(f"{path}: its weights do not fit the model config it records "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return model.eval(), info


def random_model(cfg: ModelConfig, seed: int = 0) -> MedSegLatDiff:
    """Untrained model with reproducible weights (tests, and the stand-in default plan)."""
    torch.manual_seed(seed)
    return MedSegLatDiff(cfg).eval()
