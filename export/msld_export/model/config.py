"""One object that describes a MedSegLatDiff model: sizes, noise schedule, loss weights.

The same dict is written into a plan's manifest (``model_config``), so a plan always says
exactly which architecture and schedule produced its graphs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    name: str = "lidc"
    image_size: int = 128          # square input the graphs are exported for
    image_channels: int = 1        # 1 = grayscale, 3 = RGB
    # Normalisation applied to a [0, 1] image before the encoder: (x - mean) / std per channel.
    image_mean: tuple = (0.5,)
    image_std: tuple = (0.5,)
    latent_channels: int = 4
    # Channels per resolution level; len(levels) - 1 halvings give the latent size.
    vae_channels: tuple = (16, 32, 64)        # image VAE (encoder exported, decoder train-only)
    mask_channels: tuple = (16, 32, 64)       # mask autoencoder
    unet_channels: tuple = (32, 64, 128)      # latent denoiser; attention at the last level
    attn_heads: int = 4
    norm_groups: int = 8
    # Mask autoencoder loss: weighted cross-entropy, foreground weight (the paper's point:
    # tiny structures such as small nodules survive the autoencoder).
    fg_weight: float = 10.0
    # Mask latents are multiplied by this before diffusion (as Stable Diffusion's 0.18215);
    # set after stage 1 from the latents' standard deviation.
    mask_latent_scale: float = 1.0
    # DDPM training schedule (diffusers' conventions).
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # What the denoiser network predicts: "epsilon" (the noise) or "sample" (the clean mask
    # latent, x0).  The exported denoiser graph always returns epsilon (converted inside the
    # graph), so the runtime's DDIM loop is the same for both.  Why "sample": TRAINING.md.
    prediction_type: str = "epsilon"
    # Defaults the runtime uses when the caller gives none.
    default_k: int = 8
    default_steps: int = 20
    max_k: int = 32

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.mask_channels) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def tiny_config(**overrides) -> ModelConfig:
    """A very small model for fast tests (same architecture, fewer channels)."""
    base = dict(name="tiny", image_size=32, vae_channels=(8, 8, 16), mask_channels=(8, 8, 16),
                unet_channels=(8, 16, 16), attn_heads=2, norm_groups=4)
    base.update(overrides)
    return ModelConfig(**base)
