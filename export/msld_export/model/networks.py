"""MedSegLatDiff reference model in PyTorch: image VAE, mask autoencoder, latent denoiser.

Three parts are exported to ONNX for the runtime:
  * ``ImageEncoder``  image (B,C,H,W) in normalised units -> image latent (B,4,h,w) (VAE mean)
  * ``LatentDenoiser`` (noisy mask latent, timestep, image latent) -> predicted noise
    (or the clean latent, converted to noise in the exported graph)
  * ``MaskDecoder``   scaled mask latent -> foreground probability (B,1,H,W)
The image VAE's decoder and the mask encoder exist for training only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    g = groups
    while ch % g:
        g //= 2
    return nn.GroupNorm(g, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, temb: int = 0):
        super().__init__()
        self.n1 = _norm(cin, groups)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.n2 = _norm(cout, groups)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout) if temb else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb=None):
        h = self.c1(F.silu(self.n1(x)))
        if self.t is not None:
            h = h + self.t(temb)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of the lowest-resolution feature map."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w).unbind(1)
        att = torch.softmax(torch.einsum("bndi,bndj->bnij", q, k) / math.sqrt(d), dim=-1)
        y = torch.einsum("bnij,bndj->bndi", att, v).reshape(b, c, h, w)
        return x + self.out(y)


class Encoder(nn.Module):
    """Conv encoder: len(channels)-1 stride-2 halvings, then a 1x1 head."""

    def __init__(self, cin: int, channels, groups: int, cout: int):
        super().__init__()
        self.stem = nn.Conv2d(cin, channels[0], 3, padding=1)
        blocks = []
        for i, ch in enumerate(channels):
            prev = channels[max(i - 1, 0)]
            if i > 0:
                blocks.append(nn.Conv2d(prev, prev, 3, stride=2, padding=1))
            blocks.append(ResBlock(prev, ch, groups))
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm(channels[-1], groups)
        self.head = nn.Conv2d(channels[-1], cout, 1)

    def forward(self, x):
        return self.head(F.silu(self.norm(self.blocks(self.stem(x)))))


class Decoder(nn.Module):
    """Mirror of ``Encoder``: nearest-neighbour upsampling + conv."""

    def __init__(self, cin: int, channels, groups: int, cout: int):
        super().__init__()
        ch = list(reversed(channels))
        self.stem = nn.Conv2d(cin, ch[0], 3, padding=1)
        blocks = []
        for i, c in enumerate(ch):
            prev = ch[max(i - 1, 0)]
            if i > 0:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(prev, prev, 3, padding=1)]
            blocks.append(ResBlock(prev, c, groups))
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm(ch[-1], groups)
        self.head = nn.Conv2d(ch[-1], cout, 3, padding=1)

    def forward(self, z):
        return self.head(F.silu(self.norm(self.blocks(self.stem(z)))))


class ImageVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enc = Encoder(cfg.image_channels, cfg.vae_channels, cfg.norm_groups, 2 * cfg.latent_channels)
        self.dec = Decoder(cfg.latent_channels, cfg.vae_channels, cfg.norm_groups, cfg.image_channels)

    def encode(self, x):
        mean, logvar = self.enc(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return self.dec(z), mean, logvar


class MaskAutoencoder(nn.Module):
    """Deterministic autoencoder for binary masks; decoder outputs logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enc = Encoder(1, cfg.mask_channels, cfg.norm_groups, cfg.latent_channels)
        self.dec = Decoder(cfg.latent_channels, cfg.mask_channels, cfg.norm_groups, 1)

    def encode(self, m):
        return self.enc(m * 2.0 - 1.0)

    def forward(self, m):
        return self.dec(self.encode(m))


def weighted_bce(logits, target, fg_weight: float):
    """Weighted cross-entropy for the mask autoencoder (foreground pixels weigh fg_weight)."""
    return F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor(float(fg_weight), device=logits.device))


def timestep_embedding(t, dim: int):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class LatentDenoiser(nn.Module):
    """Small UNet predicting noise from (noisy mask latent, timestep, image latent)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, g = cfg.unet_channels, cfg.norm_groups
        self.temb_dim = ch[0] * 4
        self.time = nn.Sequential(nn.Linear(ch[0], self.temb_dim), nn.SiLU(), nn.Linear(self.temb_dim, self.temb_dim))
        self.stem = nn.Conv2d(2 * cfg.latent_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            self.down.append(ResBlock(prev, c, g, self.temb_dim))
            prev = c
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.attn = SelfAttention(ch[-1], cfg.attn_heads, g)
        self.mid = ResBlock(ch[-1], ch[-1], g, self.temb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            self.up.append(ResBlock(prev + ch[i], ch[i], g, self.temb_dim))
            prev = ch[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(ch[i], ch[i - 1], 3, padding=1))
                prev = ch[i - 1]
        self.norm = _norm(ch[0], g)
        self.head = nn.Conv2d(ch[0], cfg.latent_channels, 3, padding=1)
        self.ch0 = ch[0]

    def forward(self, x, t, cond):
        temb = self.time(timestep_embedding(t, self.ch0))
        h = self.stem(torch.cat([x, cond], dim=1))
        skips = []
        for i, blk in enumerate(self.down):
            h = blk(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(self.attn(h), temb)
        for j, blk in enumerate(self.up):
            h = blk(torch.cat([h, skips.pop()], dim=1), temb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(F.silu(self.norm(h)))


class MedSegLatDiff(nn.Module):
    """All parts of one model, with the DDPM schedule buffers used in training."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_vae = ImageVAE(cfg)
        self.mask_ae = MaskAutoencoder(cfg)
        self.denoiser = LatentDenoiser(cfg)
        self.register_buffer("alphas_cumprod", alphas_cumprod(cfg), persistent=False)
        if cfg.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"unknown prediction_type {cfg.prediction_type!r} (expected 'epsilon' or 'sample')")

    def predict_eps(self, x, t, cond):
        """The noise estimate the DDIM update needs, whatever the network predicts."""
        return eps_from_output(self.denoiser(x, t, cond), x, t, self.alphas_cumprod, self.cfg.prediction_type)


def eps_from_output(out, x, t, ac, prediction_type: str):
    """Network output -> noise estimate.  For ``"sample"`` the clean-latent estimate x0 becomes
    eps = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t), from which DDIM recovers exactly that x0."""
    if prediction_type == "epsilon":
        return out
    a = ac.to(x.device)[t.long()].view(-1, 1, 1, 1)
    return (x - a.sqrt() * out) / (1.0 - a).sqrt()


def alphas_cumprod(cfg: ModelConfig) -> torch.Tensor:
    """DDPM schedule exactly as diffusers computes it (float32 linspace, float32 cumprod)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


# ---- the three exported graphs -------------------------------------------------------------

class ExportEncoder(nn.Module):
    """image in normalised units -> image latent (the VAE posterior mean)."""

    def __init__(self, model: MedSegLatDiff):
        super().__init__()
        self.vae = model.image_vae

    def forward(self, image):
        return self.vae.encode(image)[0]


class ExportDenoiser(nn.Module):
    """(noisy latent, timestep, image latent) -> predicted noise (converted from x0 if the
    network predicts the sample; see ``MedSegLatDiff.predict_eps``)."""

    def __init__(self, model: MedSegLatDiff):
        super().__init__()
        self.net = model.denoiser
        self.kind = model.cfg.prediction_type
        self.register_buffer("ac", alphas_cumprod(model.cfg), persistent=False)

    def forward(self, x, t, cond):
        return eps_from_output(self.net(x, t, cond), x, t, self.ac, self.kind)


class ExportDecoder(nn.Module):
    """scaled mask latent -> foreground probability."""

    def __init__(self, model: MedSegLatDiff):
        super().__init__()
        self.dec = model.mask_ae.dec
        self.scale = float(model.cfg.mask_latent_scale)

    def forward(self, z):
        return torch.sigmoid(self.dec(z / self.scale))
