"""Reference checkpoint (``last.ckpt`` + ``.hydra/config.yaml``) -> an ordinary msld plan.

    msld import last.ckpt --config .hydra/config.yaml --out model.plan
    python -m msld_export.reference.importer last.ckpt --config config.yaml --out model.plan

The checkpoint is read with the restricted reader (``checkpoint_reader``: no code from the file
runs, the reference code need not be installed). The three graphs are this package's own
implementation of the architecture (``model``) loaded with the checkpoint's weights - the EMA
weights where the checkpoint has them, as the reference predicts with them - and checked against
PyTorch after export. The schedule is the checkpoint's own ``net.sampler.alphas_bar``; the DDIM
rule is the reference sampler's (timesteps ``linspace_trunc``, previous timestep ``t - T // steps``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msld_sdk import __version__ as sdk_version
from msld_sdk.checksums import sha256_file
from msld_sdk.errors import CheckpointError
from msld_sdk.plan import write_plan

from ..plan_writing.export_plan import OPSET, export_checked
from ..plan_writing.manifest import build_manifest
from ..training.training_input import reference_training_input

from .checkpoint_reader import Checkpoint, read_checkpoint, state_dict_of
from .model import (DecoderGraph, Denoiser, DenoiserGraph, EncoderGraph, ImageEncoder, MaskDecoder,
                    UnsupportedReferenceOption)
from .schedule import make_betas

SOURCE_REPOSITORY = "huynhspm/Generative-Model"
SOURCE_COMMIT = "3983e93d0a95a6b858be28ab9b970cc00d032212"
DDIM_RULE = "reference-3983e93"
log = logging.getLogger("msld_sdk")

NET = "net."
TIME_TABLE_ROWS = 1000   # rows of the reference's sinusoid time table (TimeEmbedder's n_steps default)
PREFIX = {"denoiser": "net.denoise_net.", "embedder": "net.image_embedder.encoder.",
          "decoder": "net.autoencoder_module.net.decoder."}


class ConfigError(CheckpointError):
    """The run's config cannot be used (missing, unparsable, or an unsupported option)."""


# ---- config --------------------------------------------------------------------------------------

def load_config(path: str | Path) -> dict:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not a YAML config ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: not a Hydra config (top level is not a mapping)")
    return cfg


_INTERP = re.compile(r"^\$\{([A-Za-z0-9_.\[\]]+)\}$")
_TOKEN = re.compile(r"([A-Za-z0-9_]+)|\[(\d+)\]")


def _resolve(cfg: dict, v: Any, depth: int = 0) -> Any:
    """Whole-value interpolations ``${a.b[0]}`` (Hydra leaves them unresolved in .hydra/config.yaml),
    also inside lists; anything else (resolvers such as ${now:...}) is returned as written."""
    if depth > 16:
        raise ConfigError("config interpolation nests too deeply (a loop?)")
    if isinstance(v, list):
        return [_resolve(cfg, x, depth + 1) for x in v]
    m = _INTERP.match(v) if isinstance(v, str) else None
    if m is None:
        return v
    cur: Any = cfg
    for key, idx in _TOKEN.findall(m.group(1).replace(".", " ")):
        if key and isinstance(cur, dict) and key in cur:
            cur = cur[key]
        elif idx and isinstance(cur, list) and int(idx) < len(cur):
            cur = _resolve(cfg, cur[int(idx)], depth + 1)
        else:
            raise ConfigError(f"config interpolation {v} names nothing in the config")
    return _resolve(cfg, cur, depth + 1)


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    """cfg[a][b][c] for "a.b.c" (interpolations resolved), or ``default`` when absent."""
    cur: Any = cfg
    for part in dotted.split("."):
        cur = _resolve(cfg, cur)
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return _resolve(cfg, cur)


def _count(cfg: dict, dotted: str, default: int, upto: int | None = None, why: str = "") -> int:
    """A whole number >= 1 (and <= ``upto``) from the config: a count of layers, heads, channels or
    steps; else ConfigError naming the key, the value and the range (``why`` says where it is from)."""
    v = _get(cfg, dotted, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (upto is not None and v > upto):
        want = "a positive whole number" if upto is None else f"a whole number from 1 to {upto}"
        raise ConfigError(f"config {dotted} is {v!r}; expected {want}{f' ({why})' if why else ''}")
    return v


def _need(cfg: dict, dotted: str, kinds, check=None) -> Any:
    v = _get(cfg, dotted)
    if not isinstance(v, kinds) or isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(f"config {dotted} is {v!r}; expected {kinds}")
    if check is not None and not check(v):
        raise UnsupportedReferenceOption(f"config {dotted}={v!r} is outside the supported reference family")
    return v


def _option(cfg: dict, dotted: str, allowed, default=None) -> Any:
    v = _get(cfg, dotted, default)
    if v not in allowed:
        raise UnsupportedReferenceOption(f"config {dotted}={v!r} is not supported (supported: {list(allowed)})")
    return v


def _target(cfg: dict, dotted: str, suffix: str) -> None:
    t = _get(cfg, dotted + "._target_")
    if not isinstance(t, str) or t.split(".")[-1] != suffix:
        raise UnsupportedReferenceOption(f"config {dotted}._target_ is {t!r}; the importer supports {suffix} "
                                         "(the reference's latent segmentation experiments)")


def parse_reference_config(cfg: dict) -> dict:
    """The options the importer needs, validated against the supported family."""
    n = "model.net"
    _target(cfg, n, "StableDiffusionModel")
    _target(cfg, n + ".denoise_net", "UNetDiffusion")
    _target(cfg, n + ".image_embedder", "ImageEmbedder")
    _target(cfg, n + ".sampler", "DDIMSampler")
    for absent in ("label_embedder", "text_embedder"):
        if _get(cfg, f"{n}.{absent}") is not None:
            raise UnsupportedReferenceOption(f"config {n}.{absent} is set; only image conditioning is supported")
    _option(cfg, n + ".classifier_free", (False, None))
    d, e, s = n + ".denoise_net", n + ".image_embedder", n + ".sampler"
    _option(cfg, d + ".block", ("Residual",), "Residual")
    _option(cfg, d + ".attention", ("SelfAttention",), "SelfAttention")
    _option(cfg, d + ".d_cond_text", (None,))
    _option(cfg, e + ".block", ("Residual",), "Residual")
    _option(cfg, e + ".attention", ("Attention",), "Attention")
    pos = lambda v: v >= 1  # noqa: E731
    img_dims = _need(cfg, n + ".img_dims", list, lambda v: len(v) == 3 and all(isinstance(x, int) and x > 0 for x in v)
                     and v[1] == v[2])
    # the reference's TimeEmbedder has TIME_TABLE_ROWS rows whatever T is (UNetDiffusion does not pass
    # n_steps), so T above it would index past the table
    T = _count(cfg, n + ".n_train_steps", 1000, TIME_TABLE_ROWS, "the rows of the reference's time-embedding table")
    T_s = _get(cfg, s + ".n_train_steps", T)
    if T != T_s:
        raise UnsupportedReferenceOption(f"model and sampler disagree on n_train_steps ({T} vs {T_s})")
    steps = _count(cfg, s + ".n_infer_steps", 50, T, "DDIM steps up to n_train_steps, as the reference's sampler requires")
    img_ch = _need(cfg, e + ".img_channels", int, lambda v: v in (1, 3))
    size = _need(cfg, "data.image_size", int, lambda v: v in (128, 256))
    mult_e = _get(cfg, e + ".channel_multipliers", [1, 2, 4])
    if size != img_dims[1] * 2 ** (len(mult_e) - 1):
        raise UnsupportedReferenceOption(f"image size {size} with {len(mult_e)} embedder levels does not give the "
                                         f"latent size {img_dims[1]}")
    levels = _get(cfg, d + ".attention_levels", [1, 2])
    if not isinstance(levels, list) or not all(isinstance(x, int) for x in levels):
        raise UnsupportedReferenceOption(f"config {d}.attention_levels={levels!r}")
    mult_d = _get(cfg, d + ".channel_multipliers", [1, 2, 4])
    for name, m in (("denoise_net", mult_d), ("image_embedder", mult_e)):
        if not isinstance(m, list) or not m or not all(isinstance(x, int) and x >= 1 for x in m):
            raise UnsupportedReferenceOption(f"config {n}.{name}.channel_multipliers={m!r}")
    d_embed = _need(cfg, e + ".d_embed", int, pos)
    d_cond = _get(cfg, d + ".d_cond_image", d_embed)
    if d_cond != d_embed:
        raise UnsupportedReferenceOption(f"denoise_net.d_cond_image={d_cond!r} differs from image_embedder.d_embed"
                                         f"={d_embed}")
    lat_ch = _get(cfg, d + ".in_channels", img_dims[0])
    if lat_ch != img_dims[0] or _get(cfg, d + ".out_channels", lat_ch) != lat_ch:
        raise UnsupportedReferenceOption("denoise_net in/out channels must equal the latent channels img_dims[0]")
    scale = _get(cfg, n + ".latent_scaling_factor", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ConfigError(f"config {n}.latent_scaling_factor={scale!r}")
    mean, std = _normalisation(cfg, img_ch)
    return {
        "image_size": size, "image_channels": img_ch, "latent": img_dims, "n_train_steps": T,
        "denoiser": dict(in_channels=lat_ch, out_channels=lat_ch,
                         base_channels=_count(cfg, d + ".base_channels", 64),
                         channel_multipliers=mult_d, n_layer_blocks=_count(cfg, d + ".n_layer_blocks", 1),
                         attention_levels=levels, n_attention_heads=_count(cfg, d + ".n_attention_heads", 4),
                         n_attention_layers=_count(cfg, d + ".n_attention_layers", 1), d_cond_image=d_embed,
                         time_table_rows=TIME_TABLE_ROWS),
        "embedder": dict(in_channels=img_ch, z_channels=d_embed,
                         base_channels=_count(cfg, e + ".base_channels", 64), channel_multipliers=mult_e,
                         n_layer_blocks=_count(cfg, e + ".n_layer_blocks", 1)),
        # the reference freezes a pre-trained embedder (requires_grad False): LitEma keeps no shadow for it
        "embedder_frozen": bool(_get(cfg, e + ".freeze", False)) and _get(cfg, e + ".autoencoder_weight_path") is not None,
        "latent_scaling_factor": float(scale),
        "sampler": dict(n_infer_steps=steps,
                        beta_schedule=_get(cfg, s + ".beta_schedule", "base"),
                        beta_start=_get(cfg, s + ".beta_start", 1e-4), beta_end=_get(cfg, s + ".beta_end", 2e-2),
                        clip_denoised=_option(cfg, s + ".clip_denoised", (True, False), True),
                        set_final_alpha_to_one=_option(cfg, s + ".set_final_alpha_to_one", (True,), True)),
        "use_ema": _get(cfg, "model.use_ema", True) is not False,
        "mean": mean, "std": std,
    }


def _normalisation(cfg: dict, ch: int) -> tuple[list, list]:
    """(mean, std) of the run's validation transform (albumentations Normalize on [0, 1] images),
    else the reference experiments' Normalize(mean=0.5, std=0.5)."""
    mean, std = 0.5, 0.5
    for t in _get(cfg, "data.transform_val.transforms", []) or []:
        if isinstance(t, dict) and str(t.get("_target_", "")).endswith("Normalize"):
            mean, std = t.get("mean", mean), t.get("std", std)
    as_list = lambda v: [float(v)] * ch if isinstance(v, (int, float)) else [float(x) for x in v]  # noqa: E731
    try:
        mean, std = as_list(mean), as_list(std)
    except (TypeError, ValueError):
        raise ConfigError(f"data.transform_val Normalize mean/std {mean!r}/{std!r} are not numbers (an "
                          "unresolved ${...} interpolation? give the run's own .hydra/config.yaml)") from None
    if len(mean) != ch or len(std) != ch or not all(s > 0 for s in std):
        raise ConfigError(f"data.transform_val Normalize mean/std {mean}/{std} do not fit {ch} channels")
    return mean, std


# ---- weights -------------------------------------------------------------------------------------

def _ema_key(net_key: str) -> str:
    """LitEma's buffer name for the parameter ``net.<name>``: ``model_ema.`` + name without dots."""
    return "model_ema." + net_key[len(NET):].replace(".", "")


# what else a reference checkpoint of this family holds under net.: the mask VAE (frozen, with its own
# EMA) and the sampler's schedule buffers; LitEma's own counters under model_ema.
OTHER_NET_PREFIXES = ("net.image_embedder.", "net.autoencoder_module.", "net.sampler.")
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


def _uncompiled(sd: dict) -> dict:
    """A run with model.compile: true saves the net as torch.compile's wrapper (net._orig_mod.*):
    the same weights, read as net.* here."""
    if not any(k.startswith(NET + "_orig_mod.") for k in sd):
        return sd
    log.warning("msld import: the checkpoint was saved from a torch.compile'd net (model.compile: true); "
                "reading its net._orig_mod.* weights as net.*")
    return {(NET + k[len(NET + "_orig_mod."):] if k.startswith(NET + "_orig_mod.") else k): v for k, v in sd.items()}


def _check_stray_keys(sd: dict, ckpt: Checkpoint) -> None:
    """Refuse tensors the supported family has no place for (a label embedder, EMA shadows of
    weights that do not exist): a checkpoint of another configuration, which the reference's own
    strict load would refuse too."""
    shadows = {_ema_key(k) for k in sd if k.startswith(NET)}
    stray = sorted(k for k in sd if (k.startswith(NET) and not k.startswith(tuple(PREFIX.values()) + OTHER_NET_PREFIXES))
                   or (k.startswith("model_ema.") and k not in shadows and k not in EMA_COUNTERS)
                   or not k.startswith((NET, "model_ema.")))
    if stray:
        raise CheckpointError(f"{ckpt.path}: {len(stray)} tensor(s) the supported reference family has no place for "
                              f"(e.g. '{stray[0]}'); a checkpoint of another configuration than this config?")


def load_weights(module: torch.nn.Module, prefix: str, sd: dict, ckpt: Checkpoint, use_ema: bool,
                 what: str, frozen=lambda name: False) -> dict:
    """Copy the checkpoint tensors ``prefix + name`` (or their EMA shadows) into ``module``.
    Every parameter must be found with its exact shape, and every checkpoint tensor under
    ``prefix`` must be used. With ``use_ema``, every weight the reference trains has its shadow
    (LitEma keeps one per parameter with requires_grad); ``frozen(name)`` names those it does
    not train, which use their own weights as the reference's EMA swap leaves them. Returns
    counts {"params", "ema", "raw"}."""
    own = dict(module.state_dict())
    unused = {k for k in sd if k.startswith(prefix)}
    if not unused:
        raise CheckpointError(f"{ckpt.path}: not a MedSegLatDiff reference checkpoint (no '{prefix}*' weights "
                              f"for the {what})")
    counts = {"params": 0, "ema": 0, "raw": 0}
    new = {}
    for name, ref in own.items():
        key = prefix + name
        if key not in sd:
            raise CheckpointError(f"{ckpt.path}: the {what} weight '{key}' is missing (checkpoint of another "
                                  "architecture or configuration?)")
        unused.discard(key)
        src = key
        if use_ema and not frozen(name):
            src = _ema_key(key)
            if src not in sd:   # mixing EMA and raw weights silently would be neither model
                raise CheckpointError(f"{ckpt.path}: the {what} weight '{key}' has no EMA shadow '{src}', though "
                                      "the reference keeps one for every weight it trains (an edited or damaged "
                                      "checkpoint?); to import the raw weights instead set model.use_ema: false "
                                      "in the config")
            counts["ema"] += 1
        else:
            counts["raw"] += 1
        arr = ckpt.tensor(sd[src], src)
        if tuple(arr.shape) != tuple(ref.shape):
            raise CheckpointError(f"{ckpt.path}: '{src}' has shape {tuple(arr.shape)}, the config implies "
                                  f"{tuple(ref.shape)} (config and checkpoint do not match)")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise CheckpointError(f"{ckpt.path}: '{src}' is not a finite floating-point tensor")
        new[name] = torch.from_numpy(arr.astype(np.float32))
        counts["params"] += int(arr.size)
    if unused:
        raise CheckpointError(f"{ckpt.path}: {len(unused)} {what} weights are not used by the configured "
                              f"architecture (e.g. '{sorted(unused)[0]}'); config and checkpoint do not match")
    module.load_state_dict(new, strict=True)
    return counts


def _mask_decoder_shape(sd: dict, ckpt: Checkpoint) -> dict:
    """The mask VQ-VAE decoder's structure, read from its weight shapes (the run's config names
    only the path of the VAE checkpoint, not its architecture)."""
    p = PREFIX["decoder"]
    try:
        z = sd[p + "decoder_input.weight"].shape[1]
        out = sd[p + "decoder_output.2.weight"].shape[0]
    except (KeyError, IndexError):
        raise CheckpointError(f"{ckpt.path}: not a MedSegLatDiff reference checkpoint (no mask-autoencoder "
                              f"decoder '{p}*')") from None
    if p + "mid.1.q.weight" not in sd:
        raise UnsupportedReferenceOption("the mask autoencoder's middle attention is not 'Attention'")
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(p) + r"decoder\.(\d+)\.blocks\.", k)] if m})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{ckpt.path}: mask decoder levels {levels} are not 0..n-1")
    blocks = {int(m.group(1)) for k in sd
              for m in [re.match(re.escape(p) + r"decoder\.0\.blocks\.(\d+)\.", k)] if m}
    chs = [sd[f"{p}decoder.{i}.blocks.0.in_layers.2.weight"].shape[0] for i in levels]
    return dict(out_channels=int(out), z_channels=int(z), channels=[int(c) for c in chs],
                n_layer_blocks=len(blocks) - 1)


def _schedule(sd: dict, ckpt: Checkpoint, T: int) -> np.ndarray:
    """alphas_bar exactly as the reference computed and stored it (its sampler's buffer)."""
    key = "net.sampler.alphas_bar"
    if key not in sd:
        raise CheckpointError(f"{ckpt.path}: not a MedSegLatDiff reference checkpoint (no '{key}')")
    ab = ckpt.tensor(sd[key], key).astype(np.float32)
    if ab.shape != (T,) or not np.all((ab > 0) & (ab < 1)) or not np.all(np.diff(ab) < 0):
        raise CheckpointError(f"{ckpt.path}: '{key}' is not a decreasing schedule of {T} values in (0, 1)")
    fin = "net.sampler.final_alpha_bar"
    if fin in sd and not np.allclose(ckpt.tensor(sd[fin], fin), 1.0):
        raise UnsupportedReferenceOption("sampler final_alpha_bar != 1 (set_final_alpha_to_one=False)")
    return ab


def _schedule_matches_config(ab: np.ndarray, o: dict, cfg: dict, ckpt: Checkpoint) -> None:
    """The plan runs on the checkpoint's own alphas_bar (as the reference does) and records the
    config's beta schedule beside it: the two must describe the same schedule, else the config is
    another run's. Unknown schedules and given_betas are not recomputed here (the buffer rules)."""
    s = o["sampler"]
    if _get(cfg, "model.net.sampler.given_betas") is not None:
        return
    try:
        betas = make_betas(o["n_train_steps"], s["beta_schedule"], float(s["beta_start"]), float(s["beta_end"]))
    except (ValueError, TypeError):
        log.info("msld import: beta_schedule %r not recomputed; the checkpoint's alphas_bar is used", s["beta_schedule"])
        return
    want = torch.cumprod(1.0 - betas, dim=0).numpy()
    diff = float(np.abs(want - ab).max())
    if diff > 1e-4:   # float rounding is ~1e-7; another schedule differs by far more
        raise CheckpointError(f"{ckpt.path}: its alphas_bar is not the config's beta schedule ({s['beta_schedule']}, "
                              f"{s['beta_start']} to {s['beta_end']}; max difference {diff:.3g}): is the config "
                              "this run's own .hydra/config.yaml?")


def _linspace_rule_matches_torch(T: int) -> None:
    """The runtime's linspace_trunc timesteps must equal the reference's torch computation."""
    from msld_sdk import _native
    for steps in range(1, T + 1):
        ref = torch.linspace(0, T - 1, steps).to(torch.int64).flip(0).tolist()
        if list(_native.ddim_timesteps(T, steps, "linspace_trunc")) != ref:
            raise UnsupportedReferenceOption(f"T={T}: the native linspace_trunc timesteps differ from torch's at "
                                             f"steps={steps}")


# ---- the importer --------------------------------------------------------------------------------

class ImportedModel:
    """The three torch modules of an imported checkpoint plus everything the manifest records."""

    def __init__(self, checkpoint: str | Path, config: str | Path | dict):
        """``config``: the run's .hydra/config.yaml, or that config already read (a plan's
        ``provenance.config``, when a benchmark rebuilds the torch model of an imported plan)."""
        self.checkpoint = Path(checkpoint)
        self.config_path = None if isinstance(config, dict) else Path(config)
        self.config = config if isinstance(config, dict) else load_config(self.config_path)
        o = self.opts = parse_reference_config(self.config)
        with read_checkpoint(self.checkpoint) as ckpt:
            sd = _uncompiled(state_dict_of(ckpt))
            if not any(k.startswith(PREFIX["denoiser"]) for k in sd):
                raise CheckpointError(f"{ckpt.path}: not a MedSegLatDiff reference checkpoint (no "
                                      f"'{PREFIX['denoiser']}*' weights)")
            has_ema = any(k.startswith("model_ema.") for k in sd)
            self.use_ema = o["use_ema"] and has_ema
            self.alphas = _schedule(sd, ckpt, o["n_train_steps"])
            _schedule_matches_config(self.alphas, o, self.config, ckpt)
            self.mask_decoder_cfg = _mask_decoder_shape(sd, ckpt)
            if self.mask_decoder_cfg["z_channels"] != o["latent"][0]:
                raise CheckpointError(f"{ckpt.path}: mask decoder takes {self.mask_decoder_cfg['z_channels']} latent "
                                      f"channels, the config's img_dims say {o['latent'][0]}")
            self.denoiser = Denoiser(**o["denoiser"]).eval()
            self.embedder = ImageEncoder(**o["embedder"]).eval()
            self.decoder = MaskDecoder(**self.mask_decoder_cfg).eval()
            self.weights = {
                # the sinusoid time table is nn.Embedding.from_pretrained: frozen, no EMA shadow
                "denoiser": load_weights(self.denoiser, PREFIX["denoiser"], sd, ckpt, self.use_ema, "denoiser",
                                         frozen=lambda name: name.endswith("time_embedding.0.weight")),
                "embedder": load_weights(self.embedder, PREFIX["embedder"], sd, ckpt, self.use_ema, "image embedder",
                                         frozen=lambda name: o["embedder_frozen"]),
                # the mask VAE is frozen in the reference: no EMA shadows, raw weights
                "decoder": load_weights(self.decoder, PREFIX["decoder"], sd, ckpt, False, "mask decoder"),
            }
            _check_stray_keys(sd, ckpt)
            meta = ckpt.obj if isinstance(ckpt.obj, dict) else {}
            self.training = {k: meta[k] for k in ("epoch", "global_step", "pytorch-lightning_version")
                             if isinstance(meta.get(k), (int, str))}
            self.globals_seen = sorted(ckpt.globals_seen)
        L = o["latent"]
        size = o["image_size"]
        lat_hw = L[1]
        if size // 2 ** (len(self.mask_decoder_cfg["channels"]) - 1) != lat_hw:
            raise CheckpointError(f"the mask decoder's {len(self.mask_decoder_cfg['channels'])} levels do not map "
                                  f"the {lat_hw}x{lat_hw} latent to {size}x{size}")

    def graphs(self) -> dict:
        o = self.opts
        L = o["latent"]
        g = torch.Generator().manual_seed(0)
        img = torch.randn(2, o["image_channels"], o["image_size"], o["image_size"], generator=g)
        lat = torch.randn(2, *L, generator=g)
        cond = torch.randn(2, o["embedder"]["z_channels"], L[1], L[2], generator=g)
        t = torch.tensor([999.0, 10.0])
        return {
            "encoder": (EncoderGraph(self.embedder).eval(), (img,), ["image"], ["latent"], ["image"]),
            "denoiser": (DenoiserGraph(self.denoiser).eval(), (lat, t, cond), ["x", "t", "cond"], ["eps"],
                         ["x", "t", "cond"]),
            "decoder": (DecoderGraph(self.decoder, o["latent_scaling_factor"]).eval(), (lat,), ["z"], ["prob"],
                        ["z"]),
        }

    def weights_label(self) -> str:
        """``model.weights`` of the manifest: which weights the graphs hold."""
        return "ema" if self.use_ema else "raw"

    def manifest(self, provenance: dict) -> dict:
        """The plan's manifest (``plan_writing.manifest.build_manifest``): the reference's schedule
        and DDIM rule, its normalisation, and the image embedder's output as the condition."""
        o = self.opts
        L = o["latent"]
        T = o["n_train_steps"]
        steps = o["sampler"]["n_infer_steps"]
        params = {k: v["params"] for k, v in self.weights.items()}
        clip = o["sampler"]["clip_denoised"]
        return build_manifest(
            model={"name": "medseglatdiff-reference", "family": "StableDiffusionModel (reference 3983e93)",
                   "image_size": o["image_size"], "image_channels": o["image_channels"],
                   "latent_channels": L[0], "latent_size": L[1], "denoiser": o["denoiser"],
                   "image_embedder": o["embedder"], "mask_decoder": self.mask_decoder_cfg,
                   "latent_scaling_factor": o["latent_scaling_factor"], "parameters": params,
                   "weights": self.weights_label()},
            num_train_timesteps=T, beta_schedule=o["sampler"]["beta_schedule"],
            beta_start=o["sampler"]["beta_start"], beta_end=o["sampler"]["beta_end"], alphas_cumprod=self.alphas,
            spacing="linspace_trunc", clip_sample=1.0 if clip else 0.0,
            ddim={"rule": DDIM_RULE,
                  "timesteps": "trunc(float32 torch.linspace(0, T-1, steps)), descending",
                  "prev_timestep": "t - T // steps; alpha_prev = 1 (final_alpha_bar) when negative",
                  "x0_clip": "[-1, 1]" if clip else "none",
                  "source": "src/models/diffusion/sampler/{base,ddim}.py"},
            image_size=o["image_size"], image_channels=o["image_channels"], mean=o["mean"], std=o["std"],
            latent_channels=L[0], latent_size=(L[1], L[2]), condition=(o["embedder"]["z_channels"], L[1], L[2]),
            k=4, steps=steps, max_k=32, provenance=provenance,
            training_input=reference_training_input(self.config, o["image_size"], o["image_channels"], o["mean"],
                                                    o["std"]))


def write_reference_plan(m: "ImportedModel", out: str | Path, provenance: dict) -> dict:
    """Export the three graphs of ``m`` (each checked against PyTorch) and write the plan; the
    provenance gets what every reference-architecture plan records. Returns the manifest.
    Used by the importer and by ``bench_plan`` (random weights at published widths)."""
    import onnx

    _linspace_rule_matches_torch(m.opts["n_train_steps"])
    with torch.no_grad():
        graphs, errors = export_checked(m.graphs(), m.opts["n_train_steps"])
    prov = {
        "source_repository": SOURCE_REPOSITORY, "source_commit": SOURCE_COMMIT, **provenance,
        "ddim_rule": DDIM_RULE, "msld_sdk": sdk_version, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnx_opset": OPSET, "host": platform.machine(), "onnx_vs_torch_max_rel_err": errors,
    }
    blobs = {name: (f"graphs/{name}.onnx", data) for name, data in graphs.items()}
    return write_plan(out, m.manifest(prov), blobs)


def import_reference(checkpoint: str | Path, config: str | Path, out: str | Path, echo=lambda s: None) -> dict:
    """Import, export the three graphs (each checked against PyTorch), write the plan; returns
    the manifest. ``echo`` gets a line per stage (the CLI prints them: a full-size import takes
    about a minute)."""
    echo(f"reading {checkpoint} with {config} ...")
    m = ImportedModel(checkpoint, config)
    o, w = m.opts, m.weights
    echo(f"read: {o['image_size']} px x {o['image_channels']} ch, latent {tuple(o['latent'])}, T={o['n_train_steps']}; "
         f"weights {m.weights_label()} (denoiser {w['denoiser']['ema']} EMA / {w['denoiser']['raw']} raw tensors, "
         f"embedder {w['embedder']['ema']} / {w['embedder']['raw']}, mask decoder raw: frozen in the reference)")
    echo(f"plan defaults from the run: DDIM {o['sampler']['n_infer_steps']} steps (n_infer_steps), x0 clip "
         f"{'on' if o['sampler']['clip_denoised'] else 'off'}, latent scale {o['latent_scaling_factor']:g}, "
         f"Normalize mean {o['mean']} std {o['std']}")
    echo("exporting the encoder, denoiser and decoder to ONNX, each checked against PyTorch ...")
    return write_reference_plan(m, out, {
        "imported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": m.checkpoint.name, "checkpoint_sha256": sha256_file(m.checkpoint),
        "config_file": m.config_path.name, "config_sha256": sha256_file(m.config_path), "config": m.config,
        "weights": "EMA (model_ema.*), as the reference predicts" if m.use_ema else "raw (no EMA in the checkpoint)",
        "training": m.training, "trained": True,
        "checkpoint_globals": f"{len(m.globals_seen)} pickled globals, none executed (restricted reader)",
    })


def main(argv=None) -> int:
    from msld_sdk.cli.options import Formatter, add_overwrite_arg
    from msld_sdk.writing import check_output_file

    ap = argparse.ArgumentParser(prog="msld import", formatter_class=Formatter,
                                 description="Turn a checkpoint trained with the MedSegLatDiff "
                                 f"reference code ({SOURCE_REPOSITORY} @ {SOURCE_COMMIT[:7]}) into an msld plan.")
    ap.add_argument("checkpoint", help="the run's Lightning checkpoint (e.g. checkpoints/last.ckpt)")
    ap.add_argument("--config", required=True, help="the run's .hydra/config.yaml")
    ap.add_argument("-o", "--out", required=True, help="plan file to write (never one of the inputs)")
    add_overwrite_arg(ap)
    a = ap.parse_args(argv)
    check_output_file(a.out, [a.checkpoint, a.config], a.overwrite)   # before any work (docs/outputs.md)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    echo = lambda s: print(f"msld import: {s}", file=sys.stderr, flush=True)  # noqa: E731
    print(_summary(import_reference(a.checkpoint, a.config, a.out, echo=echo), a.out))
    return 0


def _summary(m: dict, out: str) -> str:
    errs = ", ".join(f"{k} {v:.1e}" for k, v in m["provenance"]["onnx_vs_torch_max_rel_err"].items())
    params = {k: f"{v / 1e6:.2f} M" for k, v in m["model"]["parameters"].items()}
    return (f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB); weights: {m['model']['weights']}; "
            f"parameters: {params}; ONNX vs PyTorch max relative error: {errs}")


if __name__ == "__main__":
    raise SystemExit(main())
