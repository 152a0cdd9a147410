"""A plan of the reference architecture at the published widths, with random weights, for speed work.

    python -m msld_export.reference.bench_plan lidc --out lidc_bench.plan [--seed 0]
    python -m msld_export.reference.bench_plan cvc --out cvc_bench.plan

Speed does not depend on the weights' values, so no trained checkpoint is needed: the family's
configuration (``FAMILIES``, after the reference experiments) goes through the importer's own
parser, modules, manifest and export path (``importer.write_reference_plan``) with seeded random
weights. The seed is recorded in ``provenance.random_seed`` so that ``msld bench --baselines`` can
rebuild the same PyTorch modules (``rebuild_random_modules``). Families ``lidc`` and ``cvc``:
widths and sources in docs/reference_import_and_parity.md.

``--base-channels D E M`` narrows the denoiser, embedder and mask decoder (tests use it to stay fast).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import os

import numpy as np
import torch

from .importer import ImportedModel, _summary, parse_reference_config, write_reference_plan
from .model import Denoiser, ImageEncoder, MaskDecoder

FAMILIES = {
    "lidc": dict(image_size=128, img_channels=1, latent=[1, 32, 32], d_embed=1,
                 denoise=dict(base_channels=128, channel_multipliers=[1, 2, 4, 4]),
                 embed=dict(base_channels=64, channel_multipliers=[1, 2, 4]),
                 vae=dict(base_channels=64, channel_multipliers=[1, 2, 4])),
    "cvc": dict(image_size=256, img_channels=3, latent=[1, 64, 64], d_embed=3,
                denoise=dict(base_channels=128, n_attention_heads=1, n_layer_blocks=2, attention_levels=[1],
                             channel_multipliers=[1, 2, 3, 4]),
                embed=dict(base_channels=64, channel_multipliers=[1, 2, 4]),
                vae=dict(base_channels=64, channel_multipliers=[1, 2, 4])),
}


def family_spec(family: str, base_channels=None) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {sorted(FAMILIES)})")
    c = copy.deepcopy(FAMILIES[family])
    if base_channels is not None:
        for part, b in zip(("denoise", "embed", "vae"), base_channels):
            c[part]["base_channels"] = int(b)
    return c


def reference_config(c: dict) -> dict:
    """The run configuration (as .hydra/config.yaml holds it) of the experiment ``c``: the
    experiment's values over the model defaults it inherits (configs/model/diffusion/net/*.yaml)."""
    denoise = dict(_target_="src.models.unet.net.UNetDiffusion", in_channels=c["latent"][0],
                   out_channels=c["latent"][0], block="Residual", n_layer_blocks=1, attention="SelfAttention",
                   attention_levels=[1, 2], n_attention_heads=4, n_attention_layers=1,
                   d_cond_image=c["d_embed"], d_cond_text=None, drop_rate=0.0)
    denoise.update(c["denoise"])
    embed = dict(_target_="src.models.components.embeds.ImageEmbedder", img_channels=c["img_channels"],
                 d_embed=c["d_embed"], block="Residual", n_layer_blocks=1, attention="Attention",
                 autoencoder_weight_path=None, freeze=False)
    embed.update(c["embed"])
    net = dict(_target_="src.models.diffusion.net.StableDiffusionModel", n_train_steps=1000, img_dims=c["latent"],
               denoise_net=denoise, image_embedder=embed, autoencoder_weight_path=None,
               latent_scaling_factor=1.0, classifier_free=False,
               sampler=dict(_target_="src.models.diffusion.sampler.DDIMSampler", n_train_steps=1000,
                            n_infer_steps=50, beta_schedule="linear", variance_type="fixed_small"))
    return dict(data=dict(image_size=c["image_size"], batch_size=16),
                model=dict(_target_="src.models.diffusion.ConditionDiffusionModule", use_ema=True, net=net))


def linear_alphas_bar(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The reference sampler's 'linear' schedule: cumprod(1 - linspace(beta_start, beta_end, T)), float32."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).numpy()


def _sinusoids(rows: int, dim: int) -> torch.Tensor:
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(rows, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def fill_random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights that keep activations O(1): weights N(0, 1/fan_in), normalisation scales
    around 1, small biases, the sinusoid table of the time embedding. Depends only on the seed
    and the parameter names and shapes (not on torch's global RNG or its default initialisers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("time_embedding.0.weight"):
                p.copy_(_sinusoids(*p.shape))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def rebuild_random_modules(denoiser: dict, embedder: dict, mask_decoder: dict, seed: int):
    """(denoiser, image embedder, mask decoder) with the random weights of seed ``seed``; the
    arguments are the manifest's ``model.denoiser``, ``model.image_embedder``, ``model.mask_decoder``."""
    return (fill_random(Denoiser(**denoiser), 3 * seed), fill_random(ImageEncoder(**embedder), 3 * seed + 1),
            fill_random(MaskDecoder(**mask_decoder), 3 * seed + 2))


class RandomReferenceModel(ImportedModel):
    """An ``ImportedModel`` made from a configuration alone: same modules, graphs and manifest."""

    def __init__(self, family: str, seed: int = 0, base_channels=None):
        spec = family_spec(family, base_channels)
        self.family, self.seed, self.spec = family, int(seed), spec
        self.checkpoint = self.config_path = None
        self.config = reference_config(spec)
        o = self.opts = parse_reference_config(self.config)
        self.use_ema = False
        sm = o["sampler"]
        self.alphas = linear_alphas_bar(o["n_train_steps"], sm["beta_start"], sm["beta_end"])
        vae = spec["vae"]
        self.mask_decoder_cfg = dict(out_channels=1, z_channels=o["latent"][0],
                                     channels=[vae["base_channels"] * m for m in vae["channel_multipliers"]],
                                     n_layer_blocks=1)
        self.denoiser, self.embedder, self.decoder = rebuild_random_modules(o["denoiser"], o["embedder"],
                                                                            self.mask_decoder_cfg, self.seed)
        self.weights = {k: {"params": sum(p.numel() for p in m.parameters())}
                        for k, m in (("denoiser", self.denoiser), ("embedder", self.embedder),
                                     ("decoder", self.decoder))}
        self.training, self.globals_seen = {}, []

    def weights_label(self) -> str:
        return f"random (seed {self.seed})"


def write_bench_plan(family: str, out, seed: int = 0, base_channels=None) -> dict:
    m = RandomReferenceModel(family, seed, base_channels)
    published = base_channels is None
    return write_reference_plan(m, out, {
        "made": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trained": False, "random_weights": True, "random_seed": m.seed, "family": family,
        "widths": "published" if published else f"narrowed: base channels {list(base_channels)}",
        "weights": "random, msld_export.reference.bench_plan.fill_random (for speed measurements only)",
        "config": m.config,
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msld_export.reference.bench_plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("--out", required=True, help="plan file to write")
    ap.add_argument("--seed", type=int, default=0, help="weights seed, recorded in provenance.random_seed")
    ap.add_argument("--base-channels", type=int, nargs=3, default=None, metavar=("DENOISER", "EMBEDDER", "DECODER"),
                    help="narrower widths than the published ones (tests)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(_summary(write_bench_plan(a.family, a.out, a.seed, a.base_channels), a.out))
    return 0


if __name__ == "__main__":   # errors as one line (exit 1, or 2 for usage), as msld's own commands
    import sys

    from msld_sdk.cli.options import run_command
    raise SystemExit(run_command("python -m msld_export.reference.bench_plan", main, sys.argv[1:]))
