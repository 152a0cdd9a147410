"""Train a MedSegLatDiff model on the CPU or a GPU, resumably (recipe and runs: export/TRAINING.md).

    python -m msld_export.training.train --config export/msld_export/configs/lidc.json
        --data ../shared/data --out runs/lidc [--stage 1|2|all] [--max-minutes N]

Stage 1 trains the image VAE and the mask autoencoder and sets the mask latent scale; stage 2
trains the latent denoiser on the frozen autoencoders, with an EMA of its weights. A run
stopped by ``--max-minutes`` (or killed) resumes where it stopped when started again with the
same command. The losses and the files written to ``--out`` are described in export/TRAINING.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.config import ModelConfig
from .data import (SegData, data_kind_for, default_data_root, dihedral, intensity_jitter, load_split, random_affine,
                   torch_batch)
from ..model.networks import MedSegLatDiff, alphas_cumprod, weighted_bce


@dataclass
class TrainOptions:
    # stage 1 (autoencoders)
    iters1: int = 3000
    minutes1: float | None = None
    batch1: int = 16            # mask autoencoder batch
    batch_vae: int = 8          # image VAE batch
    lr1: float = 2e-3
    kl_weight: float = 1e-4
    dice_weight: float = 1.0
    latent_l2: float = 1e-2         # mask AE: penalty on mean(z^2) -> zero-centred mask latents (see TRAINING.md)
    prefer_nonempty: float = 0.75   # LIDC: share of AE samples drawn among non-empty masks
    vae_every: int = 1              # train the image VAE every N-th stage-1 step
    ae_crop: int = 64               # >0: mask-AE steps on crops of this size around foreground...
    ae_crop_prob: float = 0.75      # ...with this probability (full-size masks otherwise)
    # stage 2 (denoiser)
    iters2: int = 30000
    minutes2: float | None = None
    batch2: int = 32
    lr2: float = 4e-4
    ema_decay: float = 0.999
    snr_weight_max: float = 20.0    # eps-MSE weight clip((1-abar)/abar, 1, this) per timestep; 0 = plain MSE
                                    # (cfg.prediction_type "sample" uses a plain x0-MSE instead)
    tune_encoder: bool = False      # also train the image encoder (from its stage-1 VAE weights) in stage 2
    latent_cache: bool = True
    jitter_variants: int = 4        # stage-2 image intensity variants cached per (image, flip)
    jitter_strength: float = 1.0    # scales the intensity jitter ranges (tuned-encoder stage 2)
    affine_prob: float = 0.0        # tuned-encoder stage 2: share of samples also zoomed/rotated/shifted
                                    # (their mask latents are encoded live, not cached)
    # both
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None
    save_every_min: float = 5.0
    log_every: int = 25
    eval_images: int = 64           # stage-2 sampled validation (0 = skip)
    eval_k: int = 4
    eval_steps: int = 20
    small_frac: float = 0.01        # "small nodule": foreground < 1 % of the pixels
    eval_mask_pairs: int = 1200     # (item, annotator) pairs for the stage-1 val Dice (evenly spaced; 0 = all)


# ---------------------------------------------------------------------------------------------
# helpers

def normalize(img: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.image_mean, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    return (img - mean) / std


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample (smooth=1 so that empty masks penalise predicted foreground)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def timestep_weights(ac: torch.Tensor, wmax: float) -> torch.Tensor:
    """Per-timestep weight of the epsilon MSE: clip((1 - abar) / abar, 1, wmax), normalised to
    mean 1 over the timesteps (all ones when wmax <= 1).

    With epsilon prediction an error in the predicted clean latent costs only SNR(t) times as
    much, so at high noise - where the image condition decides the mask - the loss hardly cares
    about getting the mask right and the denoiser learns to ignore the image.  Raising those
    timesteps' weight (like an x0-loss, truncated at ``wmax``) fixes this; for each timestep the
    optimum is unchanged.
    """
    if wmax <= 1:
        return torch.ones_like(ac)
    w = ((1 - ac) / ac).clamp(1.0, wmax)
    return w / w.mean()


def crop_around_foreground(m: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Square crops of ``size``, each centred on a random foreground pixel (image centre when
    empty) moved by up to size/4, kept inside the mask."""
    b, _, H, W = m.shape
    out = torch.empty(b, m.shape[1], size, size, dtype=m.dtype)
    for i in range(b):
        fg = torch.nonzero(m[i, 0] > 0.5)
        cy, cx = (fg[rng.integers(len(fg))].tolist() if len(fg) else (H // 2, W // 2))
        cy += int(rng.integers(-size // 4, size // 4 + 1))
        cx += int(rng.integers(-size // 4, size // 4 + 1))
        y0 = int(np.clip(cy - size // 2, 0, H - size))
        x0 = int(np.clip(cx - size // 2, 0, W - size))
        out[i] = m[i, :, y0:y0 + size, x0:x0 + size]
    return out


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.05 over ``progress`` in [0, 1]."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(pred, gt).sum() / s)


def _optim_to_tensors(opt: torch.optim.Optimizer, prefix: str):
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
    return tensors, json.dumps(sd["param_groups"])


def _optim_from_tensors(opt: torch.optim.Optimizer, tensors: dict, groups_json: str, prefix: str):
    state: dict = {}
    for name, v in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module):
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


# ---------------------------------------------------------------------------------------------
# evaluation helpers (also used for the fg_weight ablation)

@torch.no_grad()
def mask_ae_dice(model: MedSegLatDiff, data: SegData, small_frac: float = 0.01, batch: int = 64,
                 max_items: int | None = None) -> dict:
    """Reconstruction Dice of the mask autoencoder (threshold 0.5) on all non-empty masks of
    ``data`` (every annotator), and on the small ones (foreground < ``small_frac`` of pixels)."""
    model.eval()
    ne = data.nonempty()
    pairs = np.argwhere(ne)  # (item, annotator)
    if max_items and len(pairs) > max_items:
        pairs = pairs[np.linspace(0, len(pairs) - 1, max_items).round().astype(int)]
    d_all, d_small, fracs = [], [], []
    for s in range(0, len(pairs), batch):
        p = pairs[s:s + batch]
        m = torch.from_numpy(data.masks[p[:, 0], p[:, 1]][:, None].astype(np.float32))
        rec = (torch.sigmoid(model.mask_ae(m)) > 0.5).numpy()
        for j in range(len(p)):
            gt = m[j, 0].numpy() > 0.5
            d = dice(rec[j, 0], gt)
            d_all.append(d)
            if gt.mean() < small_frac:
                d_small.append(d)
    return {"dice_nonempty": float(np.mean(d_all)) if d_all else float("nan"), "n_nonempty": len(d_all),
            "dice_small": float(np.mean(d_small)) if d_small else float("nan"), "n_small": len(d_small),
            "small_frac": small_frac}


@torch.no_grad()
def empty_mask_latent(model: MedSegLatDiff) -> torch.Tensor:
    """Per-channel latent of an empty mask (interior mean, unscaled) - the background value."""
    dev = next(model.parameters()).device
    s = model.cfg.image_size
    z = model.mask_ae.encode(torch.zeros(1, 1, s, s, device=dev))[0]
    return z[:, 1:-1, 1:-1].mean(dim=(1, 2))


@torch.no_grad()
def recenter_mask_latents(model: MedSegLatDiff) -> list:
    """Shift the mask AE's latent space so that an empty mask encodes to ~0 (exact inside the
    latent, approximate in its 1-pixel border ring where the decoder's stem sees zero padding):
    encoder head bias -= b, decoder stem bias += W * b."""
    b = empty_mask_latent(model)
    model.mask_ae.enc.head.bias -= b
    w = model.mask_ae.dec.stem.weight  # [out, latent, 3, 3]
    model.mask_ae.dec.stem.bias += w.sum(dim=(2, 3)) @ b
    return b.tolist()


@torch.no_grad()
def mask_latent_std(model: MedSegLatDiff, data: SegData, n: int = 512, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data), size=min(n, len(data)), replace=False)
    ann = data.pick_annotators(idx, rng)
    zs = []
    for s in range(0, len(idx), 64):
        m = torch.from_numpy(data.masks[idx[s:s + 64], ann[s:s + 64]][:, None].astype(np.float32))
        zs.append(model.mask_ae.encode(m))
    return float(torch.cat(zs).std())


@torch.no_grad()
def ddim_sample(model: MedSegLatDiff, cond: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
    """Deterministic DDIM (eta=0, 'leading' spacing as diffusers) -> foreground probability."""
    cfg = model.cfg
    ac = alphas_cumprod(cfg)
    T = cfg.num_train_timesteps
    ts = (np.arange(steps) * (T // steps))[::-1]
    x = torch.randn(cond.shape[0], cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=generator)
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        eps = model.predict_eps(x, torch.full((x.shape[0],), int(t), dtype=torch.long), cond)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return torch.sigmoid(model.mask_ae.dec(x / cfg.mask_latent_scale))


@torch.no_grad()
def cond_sensitivity(model: MedSegLatDiff, data: SegData, n: int = 64, ts=(300, 500, 650, 800),
                     seed: int = 0) -> dict:
    """Does the denoiser use the image?  Epsilon MSE inside the (dilated, latent-resolution)
    foreground region with the true image latent vs. the image latents of other samples
    (rolled by one in the batch).  ``ratio`` = shuffled / true > 1 means the image helps; a model
    that ignores its condition gives 1.0 (and samples an image-independent mask)."""
    model.eval()
    dev = next(model.parameters()).device
    cfg = model.cfg
    ne = data.nonempty()
    cand = np.nonzero(ne[:, 0])[0]
    idx = cand[np.linspace(0, len(cand) - 1, min(n, len(cand))).round().astype(int)]
    img = torch.from_numpy(data.images[idx].astype(np.float32) / 255.0).to(dev)
    msk = torch.from_numpy(data.masks[idx, 0][:, None].astype(np.float32)).to(dev)
    f = cfg.image_size // cfg.latent_size
    reg = F.max_pool2d(F.max_pool2d(msk, f), 3, 1, 1).expand(-1, cfg.latent_channels, -1, -1) > 0
    ac = alphas_cumprod(cfg).to(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    cond = model.image_vae.encode(normalize(img, cfg))[0]
    x0 = model.mask_ae.encode(msk) * cfg.mask_latent_scale
    out = {}
    for t in ts:
        a = ac[t]
        noise = torch.randn(x0.shape, generator=g, device=dev)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        tt = torch.full((len(idx),), int(t), device=dev)
        e_true = float((model.predict_eps(xt, tt, cond) - noise).pow(2)[reg].mean())
        e_shuf = float((model.predict_eps(xt, tt, cond.roll(1, 0)) - noise).pow(2)[reg].mean())
        out[str(t)] = {"mse_true": e_true, "mse_shuffled": e_shuf, "ratio": e_shuf / max(e_true, 1e-12)}
    return out


@torch.no_grad()
def sampled_val_dice(model: MedSegLatDiff, data: SegData, n_images: int = 64, k: int = 4,
                     steps: int = 20, seed: int = 0) -> dict:
    """Quick check of the whole pipeline: k DDIM samples per image, mean probability > 0.5,
    Dice against every non-empty annotator mask (images with no non-empty mask are skipped)."""
    model.eval()
    cfg = model.cfg
    ne = data.nonempty()
    cand = np.nonzero(ne.any(1))[0]
    idx = cand[np.linspace(0, len(cand) - 1, min(n_images, len(cand))).round().astype(int)]
    g = torch.Generator().manual_seed(seed)
    dices, dices_small, any_hits = [], [], []
    for s in range(0, len(idx), 16):
        b = idx[s:s + 16]
        img = torch.from_numpy(data.images[b].astype(np.float32) / 255.0)
        cond = model.image_vae.encode(normalize(img, cfg))[0]
        prob = ddim_sample(model, cond.repeat_interleave(k, 0), steps, g)
        prob = prob.view(len(b), k, *prob.shape[1:]).mean(1)[:, 0].numpy()
        for j, i in enumerate(b):
            pred = prob[j] > 0.5
            for a in np.nonzero(ne[i])[0]:
                gt = data.masks[i, a] > 0
                d = dice(pred, gt)
                dices.append(d)
                if gt.mean() < 0.01:
                    dices_small.append(d)
    return {"dice_mean_pred": float(np.mean(dices)), "dice_small": float(np.mean(dices_small)) if dices_small else None,
            "n_images": int(len(idx)), "n_pairs": len(dices), "k": k, "steps": steps}


# ---------------------------------------------------------------------------------------------
# checkpoints

def save_state(out: Path, model: MedSegLatDiff, opt, ema: EMA | None, info: dict, rng):
    save_checkpoint(model, out / "last.safetensors", **info)
    tensors, groups = _optim_to_tensors(opt, "opt")
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.shadow.items()})
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"param_groups": groups, "info": json.dumps(info), "np_rng": json.dumps(rng.bit_generator.state)}
    tmp = out / "last_state.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out / "last_state.safetensors")


def load_state(out: Path):
    """-> (tensors, metadata) of last_state.safetensors, or (None, None)."""
    p = out / "last_state.safetensors"
    if not p.exists():
        return None, None
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(p)), meta


def stage2_modules(model: MedSegLatDiff, tune_encoder: bool) -> torch.nn.Module:
    """What stage 2 trains (and keeps an EMA of): the denoiser, plus the image encoder if tuned."""
    if not tune_encoder:
        return model.denoiser
    return torch.nn.ModuleDict({"denoiser": model.denoiser, "encoder": model.image_vae.enc})


def save_final(out: Path, model: MedSegLatDiff, ema: EMA | None, info: dict, tuned: torch.nn.Module | None = None):
    """model.safetensors with the EMA weights of the stage-2 modules (the live weights stay in ``model``)."""
    if ema is None:
        save_checkpoint(model, out / "model.safetensors", **info)
        return
    tuned = model.denoiser if tuned is None else tuned
    live = {k: v.clone() for k, v in tuned.state_dict().items()}
    ema.copy_to(tuned)
    save_checkpoint(model, out / "model.safetensors", **info)
    tuned.load_state_dict(live)


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.d = json.loads(path.read_text()) if path.exists() else {}

    def write(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.d, indent=1))
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------------
# training

class Trainer:
    def __init__(self, cfg: ModelConfig, train: SegData, val: SegData | None, out: Path,
                 opts: TrainOptions, fresh: bool = False, quiet: bool = False, device: str = "cpu",
                 init: str | None = None, stage: str = "all"):
        self.cfg, self.train, self.val, self.out, self.o = cfg, train, val, Path(out), opts
        self.dev = torch.device(device)  # batches are made on the CPU and moved here
        self.out.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.log = Log(self.out / "log.json")
        self.t_start = time.time()
        self.deadline = self.t_start + opts.max_minutes * 60 if opts.max_minutes is not None else None
        torch.manual_seed(opts.seed)
        self.rng = np.random.default_rng(opts.seed)
        self.model = MedSegLatDiff(cfg)
        self.init = None
        self.info = {"stage": 1, "step": 0, "stage_elapsed_s": 0.0, "stage1_done": False, "complete": False}
        self.state_tensors = self.state_meta = None
        last = self.out / "last.safetensors"
        if init and not (last.exists() and not fresh):
            # start stage 1 from another checkpoint's weights (the latent scale is recomputed)
            m, _ = load_checkpoint(init)
            same = {"mask_latent_scale": 0, "fg_weight": 0, "prediction_type": ""}
            if m.cfg.to_dict() | same != cfg.to_dict() | same:
                raise SystemExit(f"{init} has another architecture than {cfg.name}")
            self.model.load_state_dict(m.state_dict())
            self.init = init
            if stage == "2":
                # fine-tuning stage 2 of a finished model: its autoencoders and latent scale stay
                cfg.mask_latent_scale = m.cfg.mask_latent_scale
                self.info.update({"stage": 2, "stage1_done": True})
            self.print(f"initialised from {init}")
        if last.exists() and not fresh:
            m, info = load_checkpoint(last)
            if m.cfg.to_dict() | {"mask_latent_scale": 0, "fg_weight": 0} != \
                    cfg.to_dict() | {"mask_latent_scale": 0, "fg_weight": 0}:
                raise SystemExit(f"{last} was trained with another architecture; use --fresh or another --out")
            self.model = m.train()
            self.cfg = cfg = m.cfg
            self.info.update(info)
            self.state_tensors, self.state_meta = load_state(self.out)
            if self.state_meta is not None and json.loads(self.state_meta["info"]).get("step") == info.get("step") \
                    and json.loads(self.state_meta["info"]).get("stage") == info.get("stage"):
                self.rng.bit_generator.state = json.loads(self.state_meta["np_rng"])
                torch.set_rng_state(self.state_tensors["torch_rng"])
            else:
                self.state_tensors = self.state_meta = None
            self.print(f"resuming {last}: stage {self.info['stage']} step {self.info['step']} "
                       f"(stage 1 done: {self.info['stage1_done']})")
        self.model.to(self.dev)
        self.log.d.setdefault("config", cfg.to_dict())
        self.log.d["options"] = asdict(opts)
        self.log.d.setdefault("data", {"kind": train.kind, "train_items": len(train),
                                       "val_items": len(val) if val is not None else 0})
        self.log.d.setdefault("invocations", []).append(
            {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]})

    def print(self, *a):
        if not self.quiet:
            print(*a, flush=True)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _bar(self, total, initial, desc):
        tty = sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, disable=self.quiet, dynamic_ncols=tty,
                    mininterval=0.5 if tty else 60, smoothing=0.05)

    def _schedule(self, opt, lr: float, step: int, iters: int, elapsed: float, budget) -> str | None:
        """Per-step bookkeeping shared by both stages: sets the learning rate and returns None to
        go on, "budget" when the stage's minutes are spent, "deadline" at --max-minutes."""
        if budget and elapsed >= budget:
            return "budget"
        if self.out_of_time():
            return "deadline"
        prog = max(step / iters, elapsed / budget if budget else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, prog, self.o.warmup)
        return None

    def _restore_opt(self, opt, stage):
        if self.state_tensors is not None and json.loads(self.state_meta["info"]).get("stage") == stage:
            _optim_from_tensors(opt, self.state_tensors, self.state_meta["param_groups"], "opt")
            return True
        return False

    # ---- stage 1 ----------------------------------------------------------------------------
    def stage1(self) -> bool:
        """-> True when stage 1 is complete (False: stopped by --max-minutes)."""
        o, cfg, model = self.o, self.cfg, self.model
        if self.info["stage1_done"]:
            self.print("stage 1 already done")
            return True
        model.train()
        model.image_vae.to(memory_format=torch.channels_last)
        model.mask_ae.to(memory_format=torch.channels_last)
        params = list(model.image_vae.parameters()) + list(model.mask_ae.parameters())
        opt = torch.optim.AdamW(params, lr=o.lr1, weight_decay=o.weight_decay)
        step = int(self.info["step"]) if self.info["stage"] == 1 else 0
        if step:
            self._restore_opt(opt, 1)
        elif self.init:
            lg0 = self.log.d.setdefault("stage1", {})
            lg0["init"] = str(self.init)
            lg0["recentred_by"] = recenter_mask_latents(model)
            self.print("mask latents re-centred by", [round(v, 3) for v in lg0["recentred_by"]])
        elapsed0 = float(self.info["stage_elapsed_s"]) if self.info["stage"] == 1 else 0.0
        t0 = time.time()
        budget = o.minutes1 * 60 if o.minutes1 else None
        lg = self.log.d.setdefault("stage1", {})
        curve = lg.setdefault("curve", [])
        win = {"vae_l1": [], "kl": [], "mask_bce": [], "mask_dice": [], "mask_z2": []}
        bar = self._bar(o.iters1, step, "stage1")
        last_save = time.time()
        nA = self.train.num_annotators
        stop = False
        while step < o.iters1:
            why = self._schedule(opt, o.lr1, step, o.iters1, elapsed0 + time.time() - t0, budget)
            if why:
                stop = why == "deadline"
                break
            # image VAE
            if step % max(1, o.vae_every) == 0:
                idx = self.rng.integers(0, len(self.train), o.batch_vae)
                img, _ = torch_batch(self.train, idx, self.rng, augment=True, annotators=np.zeros(len(idx), int))
                x = normalize(img.to(self.dev), cfg).contiguous(memory_format=torch.channels_last)
                rec, mu, logvar = model.image_vae(x)
                l1 = (rec - x).abs().mean()
                kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
            else:
                l1 = kl = None
            # mask AE
            idx = self.rng.integers(0, len(self.train), o.batch1)
            ann = self.train.pick_annotators(idx, self.rng, o.prefer_nonempty if nA > 1 else 0.0)
            _, m = torch_batch(self.train, idx, self.rng, augment=True, annotators=ann, jitter=False)
            if o.ae_crop and o.ae_crop < cfg.image_size and self.rng.random() < o.ae_crop_prob:
                m = crop_around_foreground(m, o.ae_crop, self.rng)
            m = m.to(self.dev).contiguous(memory_format=torch.channels_last)
            z = model.mask_ae.encode(m)
            logits = model.mask_ae.dec(z)
            bce = weighted_bce(logits, m, cfg.fg_weight)
            dl = soft_dice_loss(logits, m)
            zl2 = z.float().pow(2).mean()
            loss = bce + o.dice_weight * dl + o.latent_l2 * zl2
            if l1 is not None:
                loss = loss + l1 + o.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            step += 1
            for k, v in zip(win, (l1, kl, bce, dl, zl2)):
                if v is not None:
                    win[k].append(v.item())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite stage-1 loss at step {step}")
            bar.update(1)
            if step % o.log_every == 0 or step == o.iters1:
                rec_ = {k: float(np.mean(v)) for k, v in win.items() if v}
                curve.append({"step": step, "t": round(elapsed0 + time.time() - t0, 1), **rec_})
                bar.set_postfix({k: f"{v:.3f}" for k, v in rec_.items() if k != "kl"})
                if not sys.stderr.isatty() and not self.quiet:
                    print(f"stage1 step {step} " + " ".join(f"{k}={v:.4f}" for k, v in rec_.items()), flush=True)
                win = {k: [] for k in win}
            if time.time() - last_save > o.save_every_min * 60:
                self._save1(opt, step, elapsed0 + time.time() - t0, done=False)
                last_save = time.time()
        bar.close()
        el = elapsed0 + time.time() - t0
        lg.update({"iters": step, "wall_s": round(el, 1), "final": curve[-1] if curve else None})
        if stop:
            self._save1(opt, step, el, done=False)
            self.print(f"time budget reached in stage 1 at step {step}; saved {self.out/'last.safetensors'}")
            return False
        # finalize: latent scale, val Dice (the evaluation helpers run on the CPU)
        model.cpu()
        model.eval()
        model.image_vae.to(memory_format=torch.contiguous_format)
        model.mask_ae.to(memory_format=torch.contiguous_format)
        lg["empty_mask_latent_unscaled"] = empty_mask_latent(model).tolist()
        # remove what the latent L2 left of the background offset (near-exact, see TRAINING.md)
        lg["recentred_at_end_by"] = recenter_mask_latents(model)
        std = mask_latent_std(model, self.train, seed=o.seed)
        cfg.mask_latent_scale = 1.0 / std
        lg["mask_latent_std"] = std
        lg["mask_latent_scale"] = cfg.mask_latent_scale
        with torch.no_grad():
            img = torch.from_numpy(self.train.images[:256].astype(np.float32) / 255.0)
            lg["image_latent_std"] = float(model.image_vae.encode(normalize(img, cfg))[0].std())
        if self.val is not None and len(self.val):
            lg["val_mask_ae"] = mask_ae_dice(model, self.val, o.small_frac, max_items=o.eval_mask_pairs)
            self.print("stage 1 val mask-AE reconstruction:", json.dumps(lg["val_mask_ae"]))
        self._save1(opt, step, el, done=True)
        save_checkpoint(model, self.out / "stage1.safetensors", **self.info)
        model.to(self.dev)
        self.print(f"stage 1 done: {step} iters, {el/60:.1f} min, mask_latent_scale={cfg.mask_latent_scale:.4f}")
        return True

    def _save1(self, opt, step, elapsed, done):
        self.info.update({"stage": 1, "step": step, "stage_elapsed_s": round(elapsed, 1), "stage1_done": done})
        if done:
            self.info.update({"stage": 2, "step": 0, "stage_elapsed_s": 0.0})
        save_state(self.out, self.model, opt, None, self.info, self.rng)
        self.log.write()

    # ---- stage 2 ----------------------------------------------------------------------------
    def _encode_cached(self, idx, ann, tf, jv, images: bool = True):
        """Image / mask latents for (item, flip, jitter variant) and (item, flip, annotator)
        (the image latents are skipped, returned as None, when ``images`` is False)."""
        cfg, model, data = self.cfg, self.model, self.train
        h = cfg.latent_size
        if not hasattr(self, "_img_lat"):
            n, A, V = len(data), data.num_annotators, self.o.jitter_variants
            self._img_lat = torch.empty(n, 8, V, cfg.latent_channels, h, h, dtype=torch.float16)
            self._img_have = np.zeros((n, 8, V), bool)
            self._msk_lat = torch.empty(n, 8, A, cfg.latent_channels, h, h, dtype=torch.float16)
            self._msk_have = np.zeros((n, 8, A), bool)
            self._ne = data.nonempty()
            with torch.no_grad():
                z = torch.zeros(8, 1, cfg.image_size, cfg.image_size)
                self._empty_lat = model.mask_ae.encode(dihedral(z, np.arange(8)).to(self.dev)).half().cpu()
        need_i = ~self._img_have[idx, tf, jv] if images else np.zeros(len(idx), bool)
        if need_i.any():
            j = np.nonzero(need_i)[0]
            img = torch.from_numpy(data.images[idx[j]].astype(np.float32) / 255.0)
            img = dihedral(img, tf[j])
            for u in np.nonzero(jv[j] > 0)[0]:  # deterministic jitter per (item, flip, variant)
                r = np.random.default_rng([self.o.seed, int(idx[j][u]), int(tf[j][u]), int(jv[j][u])])
                img[u:u + 1] = intensity_jitter(img[u:u + 1], r)
            with torch.no_grad():
                self._img_lat[idx[j], tf[j], jv[j]] = \
                    model.image_vae.encode(normalize(img.to(self.dev), cfg))[0].half().cpu()
            self._img_have[idx[j], tf[j], jv[j]] = True
        empty = ~self._ne[idx, ann]
        need_m = ~self._msk_have[idx, tf, ann] & ~empty
        if need_m.any():
            j = np.nonzero(need_m)[0]
            m = torch.from_numpy(data.masks[idx[j], ann[j]][:, None].astype(np.float32))
            with torch.no_grad():
                self._msk_lat[idx[j], tf[j], ann[j]] = model.mask_ae.encode(dihedral(m, tf[j]).to(self.dev)).half().cpu()
            self._msk_have[idx[j], tf[j], ann[j]] = True
        cond = self._img_lat[idx, tf, jv].float().to(self.dev) if images else None
        z = self._msk_lat[idx, tf, ann].float()
        if empty.any():
            e = np.nonzero(empty)[0]
            z[e] = self._empty_lat[tf[e]].float()
        return z.to(self.dev), cond

    def _encode_tuned(self, idx, ann):
        """Mask latents from the cache (no gradient); image latents computed here with gradient,
        from freshly augmented images (same flip/rotation as the mask, new intensity jitter).
        With ``affine_prob`` > 0 that share of the samples is also zoomed / rotated / shifted
        together with its mask, whose latent is then encoded live."""
        tf = self.rng.integers(0, 8, len(idx))
        z0, _ = self._encode_cached(idx, ann, tf, np.zeros(len(idx), int), images=False)
        img = dihedral(torch.from_numpy(self.train.images[idx].astype(np.float32) / 255.0), tf)
        if self.o.affine_prob > 0:
            aff = np.nonzero(self.rng.random(len(idx)) < self.o.affine_prob)[0]
            if len(aff):
                m = torch.from_numpy(self.train.masks[idx[aff], ann[aff]][:, None].astype(np.float32))
                img_a, m_a = random_affine(img[aff], dihedral(m, tf[aff]), self.rng)
                img[aff] = img_a
                with torch.no_grad():
                    z0[torch.from_numpy(aff).to(z0.device)] = self.model.mask_ae.encode(m_a.to(self.dev))
        img = intensity_jitter(img, self.rng, strength=self.o.jitter_strength)
        mean, _ = self.model.image_vae.encode(normalize(img.to(self.dev), self.cfg))
        return z0, mean

    def _encode_live(self, idx, ann):
        img, m = torch_batch(self.train, idx, self.rng, augment=True, annotators=ann)
        img, m = img.to(self.dev), m.to(self.dev)
        with torch.no_grad():
            return self.model.mask_ae.encode(m), self.model.image_vae.encode(normalize(img, self.cfg))[0]

    def stage2(self) -> bool:
        o, cfg, model = self.o, self.cfg, self.model
        if not self.info["stage1_done"]:
            self.print("warning: stage 1 not complete; finalising its latent scale and going on")
            with torch.no_grad():
                model.cpu()
                cfg.mask_latent_scale = 1.0 / mask_latent_std(model, self.train, seed=o.seed)
                model.to(self.dev)
            self.info.update({"stage1_done": True, "stage": 2, "step": 0, "stage_elapsed_s": 0.0})
        if self.info.get("complete"):
            self.print("stage 2 already complete")
            return True
        model.image_vae.eval().requires_grad_(False)
        model.mask_ae.eval().requires_grad_(False)
        tuned = stage2_modules(model, o.tune_encoder)
        tuned.train().requires_grad_(True)
        params = list(tuned.parameters())
        opt = torch.optim.AdamW(params, lr=o.lr2, weight_decay=o.weight_decay)
        ema = EMA(tuned, o.ema_decay)
        predict_x0 = cfg.prediction_type == "sample"
        step = int(self.info["step"]) if self.info["stage"] == 2 else 0
        if step and self._restore_opt(opt, 2):
            ema.shadow = {k[4:]: v.float().to(self.dev) for k, v in self.state_tensors.items()
                          if k.startswith("ema.")}
        ac = alphas_cumprod(cfg).to(self.dev)
        T = cfg.num_train_timesteps
        scale = cfg.mask_latent_scale
        tw = torch.ones_like(ac) if predict_x0 else timestep_weights(ac, o.snr_weight_max)
        elapsed0 = float(self.info["stage_elapsed_s"]) if self.info["stage"] == 2 else 0.0
        t0 = time.time()
        budget = o.minutes2 * 60 if o.minutes2 else None
        lg = self.log.d.setdefault("stage2", {})
        curve = lg.setdefault("curve", [])
        win = []
        bar = self._bar(o.iters2, step, "stage2")
        last_save = time.time()
        stop = False
        while step < o.iters2:
            why = self._schedule(opt, o.lr2, step, o.iters2, elapsed0 + time.time() - t0, budget)
            if why:
                stop = why == "deadline"
                break
            idx = self.rng.integers(0, len(self.train), o.batch2)
            ann = self.train.pick_annotators(idx, self.rng)  # uniform over the 4 (empty included)
            if o.tune_encoder:
                z0, cond = self._encode_tuned(idx, ann)
            elif o.latent_cache:
                tf = self.rng.integers(0, 8, len(idx))
                jv = self.rng.integers(0, max(1, o.jitter_variants), len(idx))
                z0, cond = self._encode_cached(idx, ann, tf, jv)
            else:
                z0, cond = self._encode_live(idx, ann)
            x0 = z0 * scale
            t = torch.randint(0, T, (len(idx),), device=self.dev)
            noise = torch.randn_like(x0)
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = x0 if predict_x0 else noise
            err = (model.denoiser(xt, t, cond) - target).pow(2).mean(dim=(1, 2, 3))
            loss = err.mean()
            opt.zero_grad(set_to_none=True)
            (err * tw[t]).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            step += 1
            ema.update(tuned, step)
            lv = loss.item()
            if not math.isfinite(lv):
                raise FloatingPointError(f"non-finite stage-2 loss at step {step}")
            win.append(lv)
            bar.update(1)
            if step % o.log_every == 0 or step == o.iters2:
                curve.append({"step": step, "t": round(elapsed0 + time.time() - t0, 1), "loss": float(np.mean(win))})
                bar.set_postfix(loss=f"{np.mean(win):.4f}")
                if not sys.stderr.isatty() and not self.quiet:
                    print(f"stage2 step {step} loss={np.mean(win):.4f} lr={opt.param_groups[0]['lr']:.2e}", flush=True)
                win = []
            if time.time() - last_save > o.save_every_min * 60:
                self._save2(opt, ema, step, elapsed0 + time.time() - t0, complete=False, tuned=tuned)
                last_save = time.time()
        bar.close()
        el = elapsed0 + time.time() - t0
        lg.update({"iters": step, "wall_s": round(el, 1), "final_loss": curve[-1]["loss"] if curve else None})
        if stop:
            self._save2(opt, ema, step, el, complete=False, tuned=tuned)
            self.print(f"time budget reached in stage 2 at step {step}; saved {self.out}")
            return False
        self._save2(opt, ema, step, el, complete=True, tuned=tuned)
        tuned.eval()
        if self.val is not None and len(self.val):
            live = {k: v.clone() for k, v in tuned.state_dict().items()}
            ema.copy_to(tuned)
            model.cpu()
            lg["val_cond_sensitivity"] = cond_sensitivity(model, self.val, seed=o.seed)
            self.print("stage 2 val (EMA) image-condition check, foreground eps-MSE shuffled/true:",
                       {t: round(v["ratio"], 3) for t, v in lg["val_cond_sensitivity"].items()})
            if o.eval_images:
                lg["val_sampled"] = sampled_val_dice(model, self.val, o.eval_images, o.eval_k, o.eval_steps, o.seed)
                self.print("stage 2 val (EMA, sampled):", json.dumps(lg["val_sampled"]))
            model.to(self.dev)
            tuned.load_state_dict(live)
            self.log.write()
        self.print(f"stage 2 done: {step} iters, {el/60:.1f} min; model: {self.out/'model.safetensors'}")
        return True

    def _save2(self, opt, ema, step, elapsed, complete, tuned=None):
        self.info.update({"stage": 2, "step": step, "stage_elapsed_s": round(elapsed, 1), "stage1_done": True,
                          "complete": complete})
        save_state(self.out, self.model, opt, ema, self.info, self.rng)
        save_final(self.out, self.model, ema, self.info, tuned)
        self.log.write()

    def run(self, stage: str = "all") -> bool:
        ok = True
        if stage in ("1", "all"):
            ok = self.stage1()
        if ok and stage in ("2", "all"):
            ok = self.stage2()
        self.log.d["wall_s_total"] = round(self.log.d.get("wall_s_total", 0) + time.time() - self.t_start, 1)
        self.log.d["invocations"][-1]["wall_s"] = round(time.time() - self.t_start, 1)
        self.log.d["invocations"][-1]["finished"] = ok
        self.log.write()
        return ok


# ---------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m msld_export.training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="model config JSON (export/msld_export/configs/*.json)")
    p.add_argument("--data", default=None, help="data root (default ../shared/data from the repo root)")
    p.add_argument("--out", help="run directory, e.g. runs/lidc")
    p.add_argument("--kind", default=None, help="data set: lidc|polyp|kvasir|cvc (default: from config name)")
    p.add_argument("--stage", default="all", choices=["1", "2", "all"])
    p.add_argument("--fresh", action="store_true", help="ignore an existing last.safetensors in --out")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights (when --out has no last.safetensors)")
    p.add_argument("--fg-weight", type=float, default=None, help="override cfg.fg_weight (ablation)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items of each split (tests)")
    p.add_argument("--cvc-fold", default=None, metavar="F/N",
                   help="CVC-ClinicDB cross-validation fold (kinds cvc, polyp; msld_sdk.evaluation.datasets.cvc_split)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads were 5-10x slower per step)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--nice", type=int, default=19, help="raise this process's niceness to this value")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--eval-mask-ae", metavar="CKPT", default=None,
                   help="only report mask-AE reconstruction Dice of CKPT on the val split and exit")
    d = TrainOptions()
    for k, v in asdict(d).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=v, metavar="BOOL")
        else:
            p.add_argument(flag, type=float if k in ("minutes1", "minutes2", "max_minutes") or isinstance(v, float)
                           else int, default=v)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.nice:
        try:
            cur = os.nice(0)
            if cur < args.nice:
                os.nice(args.nice - cur)
        except OSError:
            pass
    root = Path(args.data) if args.data else default_data_root()
    if args.eval_mask_ae:
        model, _ = load_checkpoint(args.eval_mask_ae)
        kind = args.kind or data_kind_for(model.cfg.name)
        val = load_split(kind, root, "val", model.cfg.image_size, args.limit)
        r = mask_ae_dice(model, val, TrainOptions.small_frac)
        print(json.dumps({"checkpoint": args.eval_mask_ae, "fg_weight": model.cfg.fg_weight, **r}, indent=1))
        return 0
    if not args.config or not args.out:
        build_parser().error("--config and --out are required")
    cfg = ModelConfig.load(args.config)
    if args.fg_weight is not None:
        cfg.fg_weight = args.fg_weight
    kind = args.kind or data_kind_for(cfg.name)
    opts = TrainOptions(**{k: getattr(args, k) for k in asdict(TrainOptions())})
    t = time.time()
    fold = {"cvc_fold": args.cvc_fold} if args.cvc_fold else {}
    train = load_split(kind, root, "train", cfg.image_size, args.limit, **fold)
    val = load_split(kind, root, "val", cfg.image_size, args.limit, **fold)
    if not args.quiet:
        print(f"data {kind}: {len(train)} train / {len(val)} val items, loaded in {time.time()-t:.1f}s; "
              f"threads={torch.get_num_threads()} device={args.device}", flush=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tr = Trainer(cfg, train, val, Path(args.out), opts, fresh=args.fresh, quiet=args.quiet, device=device,
                 init=args.init, stage=args.stage)
    ok = tr.run(args.stage)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
