"""Train a reference-architecture (huynhspm/Generative-Model @ 3983e93) LIDC model on CPU, resumably.

    python -m msld_export.training.train_reference --config CONFIG.yaml --data ../shared/data \
        --out runs/ref_lidc [--minutes M] [--resume]

Stage 1 trains the mask VQ-VAE (the reference's objective: MSE of the reconstruction of the mask
in [-1, 1] plus the VQ codebook and 0.25-weighted commitment losses); stage 2 trains the
conditional denoiser and the image embedder on the frozen VQ-VAE's quantised latents (the
config's beta schedule, epsilon prediction, MSE), both with LitEma-style EMA shadows. The
architecture comes from the Hydra config via ``msld_export.reference``; optimiser settings are
CPU-budget choices recorded in export/TRAINING.md. Every save writes ``state.pt`` (resume),
a Lightning-style ``last.ckpt`` (plain tensors, keys as the reference names them) with the
config beside it, ``mask_vae.ckpt``, and appends to ``train.log``. ``msld import`` reads it.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msld_sdk.evaluation.datasets import load_split

from ..reference.importer import load_config, parse_reference_config
from ..reference.schedule import make_betas
from ..reference.model import Denoiser, ImageEncoder, MaskDecoder, MultiHeadSelfAttention
from .data import dihedral

LIGHTNING_VERSION = "2.6.6"   # what the fixture's checkpoint records; informational only


# ---- model pieces the reference trains but the inference plan does not need ----------------------

class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation of each latent pixel; straight-through gradient.
    loss = mse(sg(z), e) + beta * mse(z, sg(e))."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def forward(self, z):
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * flat @ e.t()
        q = e[d.argmin(1)].reshape(b, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), loss


class MaskVQVAE(nn.Module):
    """Attribute names as the reference's VQVAE (``vq_layer``, ``encoder``, ``decoder``)."""

    def __init__(self, base_channels: int, multipliers, z_channels: int = 1, n_codes: int = 512,
                 n_layer_blocks: int = 1):
        super().__init__()
        self.vq_layer = VectorQuantizer(n_codes, z_channels)
        self.encoder = ImageEncoder(1, z_channels, base_channels, multipliers, n_layer_blocks)
        self.decoder = MaskDecoder(1, z_channels, [base_channels * m for m in multipliers], n_layer_blocks)

    def encode(self, m):
        return self.vq_layer(self.encoder(m))

    def forward(self, m):
        z, vq = self.encode(m)
        return self.decoder(z), vq


def init_reference_style(module: nn.Module) -> None:
    """Parameters model.py leaves uninitialised (packed attention projections, sinusoid table)."""
    for m in module.modules():
        if isinstance(m, MultiHeadSelfAttention):   # as torch.nn.MultiheadAttention initialises them
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
            nn.init.zeros_(m.out_proj.bias)
    if isinstance(module, Denoiser):
        table = module.time_embedder.time_embedding[0]
        rows, d = table.weight.shape
        freq = torch.exp(-torch.arange(0, d, 2).float() / d * math.log(10000.0))
        arg = torch.arange(rows).float()[:, None] * freq[None]
        table.weight.data.copy_(torch.stack([arg.sin(), arg.cos()], -1).reshape(rows, d))
        table.weight.requires_grad_(False)   # a frozen table in the reference (no EMA shadow)


class LitEmaShadow:
    """EMA as the reference's LitEma: decay_n = min(decay, (1 + n) / (10 + n)); buffers named
    after the trainable parameters with the dots removed."""

    def __init__(self, named_params, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = collections.OrderedDict((n.replace(".", ""), p.detach().clone())
                                              for n, p in named_params if p.requires_grad)

    @torch.no_grad()
    def update(self, named_params):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in named_params:
            if p.requires_grad:
                s = self.shadow[n.replace(".", "")]
                s.sub_((1.0 - d) * (s - p))

    def buffers(self, prefix: str) -> dict:
        out = {prefix + "decay": torch.tensor(self.decay, dtype=torch.float32),
               prefix + "num_updates": torch.tensor(self.num_updates, dtype=torch.int32)}
        out.update({prefix + k: v.clone() for k, v in self.shadow.items()})
        return out

    def state(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load(self, st):
        self.decay, self.num_updates = st["decay"], st["num_updates"]
        for k, v in st["shadow"].items():
            self.shadow[k].copy_(v)


class Diffusion(nn.Module):
    """The trainable part of the reference's StableDiffusionModel: ``denoise_net`` and
    ``image_embedder.encoder``."""

    def __init__(self, opts: dict):
        super().__init__()
        self.denoise_net = Denoiser(**opts["denoiser"])
        self.image_embedder = nn.Module()
        self.image_embedder.encoder = ImageEncoder(**opts["embedder"])
        init_reference_style(self.denoise_net)
        init_reference_style(self.image_embedder)

    def forward(self, zt, t, image):
        return self.denoise_net(zt, t, self.image_embedder.encoder(image))


# ---- data -----------------------------------------------------------------------------------------

def batch(data, idx, rng: np.random.Generator):
    """(image, mask) in the reference's units: (x - 0.5) / 0.5, one random annotator, horizontal
    flip with probability 0.5 (its LIDC training transform)."""
    idx = np.asarray(idx)
    ann = data.pick_annotators(idx, rng)
    img = torch.from_numpy(data.images[idx, :1].astype(np.float32) / 255.0)
    msk = torch.from_numpy(data.masks[idx, ann][:, None].astype(np.float32))
    tf = 4 * rng.integers(0, 2, size=len(idx))
    img, msk = dihedral(img, tf), dihedral(msk, tf)
    return img * 2 - 1, msk * 2 - 1


def crop_around_foreground(m: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """size x size windows of masks in [-1, 1], each centred near a random foreground pixel (the
    image centre for empty masks): a cheaper stage-1 step; the networks are convolutional."""
    b, _, h, w = m.shape
    out = torch.empty(b, 1, size, size)
    for i in range(b):
        fg = torch.nonzero(m[i, 0] > 0)
        cy, cx = (fg[rng.integers(len(fg))].tolist() if len(fg) else (h // 2, w // 2))
        cy, cx = cy + int(rng.integers(-size // 4, size // 4 + 1)), cx + int(rng.integers(-size // 4, size // 4 + 1))
        y0 = int(np.clip(cy - size // 2, 0, h - size))
        x0 = int(np.clip(cx - size // 2, 0, w - size))
        out[i] = m[i, :, y0:y0 + size, x0:x0 + size]
    return out


# ---- the trainer ----------------------------------------------------------------------------------

class Run:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = load_config(a.config)
        self.opts = parse_reference_config(self.cfg)
        o = self.opts
        if o["image_channels"] != 1:
            raise SystemExit("this trainer is for the LIDC family (1-channel images)")
        if o["image_size"] != a.size:
            print(f"note: training at {a.size}x{a.size}, the config says {o['image_size']}")
        mult = [int(x) for x in a.mask_mult.split(",")]
        self.mask_shape = dict(base_channels=a.mask_base, multipliers=mult, z_channels=o["latent"][0],
                               n_codes=a.mask_codes)
        torch.manual_seed(a.seed)
        self.vae = MaskVQVAE(**self.mask_shape)
        self.diff = Diffusion(o)
        s = o["sampler"]
        betas = make_betas(o["n_train_steps"], s["beta_schedule"], s["beta_start"], s["beta_end"])
        self.alphas_bar = torch.cumprod(1.0 - betas, 0)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=a.lr_ae, weight_decay=0.0)
        self.opt = torch.optim.Adam([p for p in self.diff.parameters() if p.requires_grad], lr=a.lr,
                                    weight_decay=0.0)
        self.vae_ema = LitEmaShadow(self.vae.named_parameters(), a.ema_decay_ae)
        self.ema = LitEmaShadow(self.diff.named_parameters(), a.ema_decay)
        self.step1 = self.step2 = 0
        self.wall_s = self.cpu_s = 0.0
        self.rng = np.random.default_rng(a.seed)
        self.history = []
        self.train = load_split("lidc", a.data, "train", a.size, limit=a.limit, channels=1)
        self.val = load_split("lidc", a.data, "val", a.size, limit=a.val_limit, channels=1)
        self.log(f"data: {len(self.train)} train slices ({len(set(self.train.groups))} patients), "
                 f"{len(self.val)} val slices ({len(set(self.val.groups))} patients)")
        if (self.out / "state.pt").exists():
            if not a.resume:
                raise SystemExit(f"{self.out}/state.pt exists: pass --resume to continue it, or another --out")
            self.load()
        elif a.resume:
            self.log("--resume: no state.pt yet, starting afresh")

    # -- bookkeeping
    def log(self, msg: str):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.out / "train.log", "a") as f:
            f.write(line + "\n")

    def state(self):
        return {"vae": self.vae.state_dict(), "diff": self.diff.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                "opt": self.opt.state_dict(), "vae_ema": self.vae_ema.state(), "ema": self.ema.state(),
                "step1": self.step1, "step2": self.step2, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "history": self.history, "mask_shape": self.mask_shape}

    def load(self):
        st = torch.load(self.out / "state.pt", map_location="cpu", weights_only=False)   # our own file
        if st["mask_shape"] != self.mask_shape:
            raise SystemExit(f"state.pt has mask VQ-VAE {st['mask_shape']}, the arguments give {self.mask_shape}")
        self.vae.load_state_dict(st["vae"])
        self.diff.load_state_dict(st["diff"])
        self.vae_opt.load_state_dict(st["vae_opt"])
        self.opt.load_state_dict(st["opt"])
        self.vae_ema.load(st["vae_ema"])
        self.ema.load(st["ema"])
        self.step1, self.step2 = st["step1"], st["step2"]
        self.wall_s, self.cpu_s = st["wall_s"], st["cpu_s"]
        self.rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        self.history = st["history"]
        self.log(f"resumed: stage-1 step {self.step1}, stage-2 step {self.step2}, "
                 f"{self.wall_s / 60:.1f} wall / {self.cpu_s / 60:.1f} CPU minutes so far")

    def reference_state_dict(self) -> collections.OrderedDict:
        """``state_dict`` of the reference's ConditionDiffusionModule, plain tensors."""
        sd = collections.OrderedDict()
        for k, v in self.diff.state_dict().items():
            sd["net." + k] = v.clone()
        for k, v in self.vae.state_dict().items():
            sd["net.autoencoder_module.net." + k] = v.clone()
        sd.update(self.vae_ema.buffers("net.autoencoder_module.model_ema."))
        sd["net.sampler.alphas_bar"] = self.alphas_bar.clone()
        sd["net.sampler.sqrt_alphas_bar"] = self.alphas_bar.sqrt()
        sd["net.sampler.sqrt_one_minus_alphas_bar"] = (1 - self.alphas_bar).sqrt()
        sd["net.sampler.final_alpha_bar"] = torch.tensor([1.0])
        sd.update(self.ema.buffers("model_ema."))
        return sd

    def _atomic_save(self, obj, name: str):
        tmp = self.out / (name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self.out / name)

    def save(self):
        meta = {"epoch": 0, "global_step": self.step2, "pytorch-lightning_version": LIGHTNING_VERSION}
        self._atomic_save(self.state(), "state.pt")
        self._atomic_save({**meta, "state_dict": self.reference_state_dict()}, "last.ckpt")
        vae_sd = collections.OrderedDict(("net." + k, v.clone()) for k, v in self.vae.state_dict().items())
        vae_sd.update(self.vae_ema.buffers("model_ema."))
        self._atomic_save({**meta, "global_step": self.step1, "state_dict": vae_sd}, "mask_vae.ckpt")
        if Path(self.a.config).resolve() != (self.out / "config.yaml").resolve():
            shutil.copyfile(self.a.config, self.out / "config.yaml")

    # -- stage 1: mask VQ-VAE
    def lr_ae(self):
        epoch = self.step1 * self.a.batch_ae // max(1, len(self.train))
        return self.a.lr_ae * self.a.ae_gamma ** epoch     # ExponentialLR per epoch, as the reference

    def step_ae(self):
        self.vae.train()
        idx = self.rng.integers(0, len(self.train), self.a.batch_ae)
        _, m = batch(self.train, idx, self.rng)
        if self.a.ae_crop and self.rng.random() < self.a.ae_crop_prob:
            m = crop_around_foreground(m, self.a.ae_crop, self.rng)
        for g in self.vae_opt.param_groups:
            g["lr"] = self.lr_ae()
        rec, vq = self.vae(m)
        recon = F.mse_loss(rec, m)
        loss = recon + vq
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        self.vae_ema.update(self.vae.named_parameters())
        self.step1 += 1
        return {"loss": loss.item(), "recon": recon.item(), "vq": vq.item()}

    @torch.no_grad()
    def val_ae(self, n: int = 32) -> dict:
        """Dice of the raw-weight VQ-VAE's reconstructions (decoded * 0.5 + 0.5 > 0.5) over
        non-empty val masks, as the diffusion stage uses it."""
        self.vae.eval()
        ne = np.argwhere(self.val.masks.reshape(*self.val.masks.shape[:2], -1).any(-1))[:n]
        if len(ne) == 0:
            return {}
        m = torch.from_numpy(self.val.masks[ne[:, 0], ne[:, 1]][:, None].astype(np.float32))
        rec = (self.vae(m * 2 - 1)[0] * 0.5 + 0.5).clamp(0, 1) > 0.5
        inter = (rec & (m > 0.5)).flatten(1).sum(1).float()
        dice = (2 * inter / (rec.flatten(1).sum(1) + (m > 0.5).flatten(1).sum(1)).clamp(min=1)).mean().item()
        z = self.vae.encode(m * 2 - 1)[0]
        return {"val_dice": dice, "z_std": z.std().item(), "codes_used": int(torch.unique(z).numel())}

    # -- stage 2: conditional denoiser + image embedder
    def lr2(self):
        a, s = self.a, self.step2
        if s < a.warmup:
            return a.lr * (s + 1) / a.warmup
        p = min(1.0, (s - a.warmup) / max(1, a.steps - a.warmup))
        return a.lr * (a.lr_floor + (1 - a.lr_floor) * 0.5 * (1 + math.cos(math.pi * p)))

    def step_diff(self):
        self.diff.train()
        self.vae.eval()
        idx = self.rng.integers(0, len(self.train), self.a.batch)
        img, m = batch(self.train, idx, self.rng)
        with torch.no_grad():
            z0 = self.vae.encode(m)[0] * self.opts["latent_scaling_factor"]
        t = torch.from_numpy(self.rng.integers(0, len(self.alphas_bar), len(idx)))
        eps = torch.from_numpy(self.rng.standard_normal(z0.shape).astype(np.float32))
        ab = self.alphas_bar[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        for g in self.opt.param_groups:
            g["lr"] = self.lr2()
        loss = F.mse_loss(self.diff(zt, t, img), eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in self.diff.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.ema.update(self.diff.named_parameters())
        self.step2 += 1
        return {"loss": loss.item()}

    @torch.no_grad()
    def val_diff(self, n: int = 32) -> dict:
        """eps-MSE of the EMA weights on fixed val slices, timesteps and noise."""
        g = np.random.default_rng(1234)
        idx = np.arange(min(n, len(self.val)))
        img = torch.from_numpy(self.val.images[idx, :1].astype(np.float32) / 255.0) * 2 - 1
        m = torch.from_numpy(self.val.masks[idx, 0][:, None].astype(np.float32)) * 2 - 1
        self.vae.eval()
        z0 = self.vae.encode(m)[0] * self.opts["latent_scaling_factor"]
        t = torch.from_numpy(g.integers(0, len(self.alphas_bar), len(idx)))
        eps = torch.from_numpy(g.standard_normal(z0.shape).astype(np.float32))
        ab = self.alphas_bar[t].view(-1, 1, 1, 1)
        raw = {k: v.clone() for k, v in self.diff.state_dict().items()}
        params = dict(self.diff.named_parameters())
        for name, p in params.items():
            if p.requires_grad:
                p.data.copy_(self.ema.shadow[name.replace(".", "")])
        self.diff.eval()
        loss = F.mse_loss(self.diff(ab.sqrt() * z0 + (1 - ab).sqrt() * eps, t, img), eps).item()
        self.diff.load_state_dict(raw)
        return {"val_eps_mse_ema": loss}

    # -- the loop
    def run(self):
        a = self.a
        t_wall, t_cpu = time.time(), time.process_time()
        last_save, stage_losses = time.time(), []
        base_wall, base_cpu = self.wall_s, self.cpu_s

        def clocks():
            self.wall_s = base_wall + time.time() - t_wall
            self.cpu_s = base_cpu + time.process_time() - t_cpu

        def checkpoint(extra: dict):
            clocks()
            rec = {"stage": 1 if self.step1 < a.ae_steps else 2, "step1": self.step1, "step2": self.step2,
                   "wall_min": round(self.wall_s / 60, 2), "cpu_min": round(self.cpu_s / 60, 2), **extra}
            self.history.append(rec)
            self.save()
            self.log("save " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in rec.items()))

        while True:
            if time.time() - t_wall > a.minutes * 60:
                break
            if self.step1 < a.ae_steps:
                r = self.step_ae()
                step, stage = self.step1, 1
            elif self.step2 < a.steps:
                if self.step2 == 0 and not any(h.get("stage1_done") for h in self.history):
                    checkpoint({"stage1_done": 1, **self.val_ae()})
                    stage_losses = []
                r = self.step_diff()
                step, stage = self.step2, 2
            else:
                break
            stage_losses.append(r["loss"])
            if step % a.log_every == 0:
                clocks()
                self.log(f"stage {stage} step {step} loss {np.mean(stage_losses):.5f} "
                         + " ".join(f"{k} {v:.5f}" for k, v in r.items() if k != "loss")
                         + f" lr {self.lr_ae() if stage == 1 else self.lr2():.2e}"
                         + f" wall_min {self.wall_s / 60:.2f} cpu_min {self.cpu_s / 60:.2f}")
                stage_losses = []
            if time.time() - last_save > a.save_every_min * 60:
                checkpoint(self.val_ae() if stage == 1 else self.val_diff())
                last_save = time.time()
        done = self.step1 >= a.ae_steps and self.step2 >= a.steps
        checkpoint({**(self.val_ae() if self.step1 < a.ae_steps else self.val_diff()), "finished": int(done)})
        return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m msld_export.training.train_reference", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the reference run's Hydra config (.hydra/config.yaml)")
    ap.add_argument("--data", default=None, help="data root holding lidc/ (default ../shared/data)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="first N training slices only (tests)")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--mask-base", type=int, default=32, help="mask VQ-VAE base channels (fixture: 32)")
    ap.add_argument("--mask-mult", default="1,2,2", help="mask VQ-VAE channel multipliers (fixture: 1,2,2)")
    ap.add_argument("--mask-codes", type=int, default=512)
    ap.add_argument("--ae-steps", type=int, default=1500, help="stage-1 (mask VQ-VAE) steps")
    ap.add_argument("--batch-ae", type=int, default=16)
    ap.add_argument("--lr-ae", type=float, default=5e-3)
    ap.add_argument("--ae-crop", type=int, default=64, help="stage-1 crop size (0: full masks only)")
    ap.add_argument("--ae-crop-prob", type=float, default=0.75)
    ap.add_argument("--ae-gamma", type=float, default=0.95, help="stage-1 learning-rate factor per epoch")
    ap.add_argument("--ema-decay-ae", type=float, default=0.999)
    ap.add_argument("--steps", type=int, default=60000, help="planned stage-2 steps (cosine schedule length)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-floor", type=float, default=0.1, help="final stage-2 learning rate / --lr")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    return Run(a).run()


if __name__ == "__main__":
    raise SystemExit(main())
