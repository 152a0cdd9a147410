"""Checkpoint -> three ONNX graphs (checked against PyTorch) -> one plan file.

    python -m msld_export.plan_writing.export_plan CHECKPOINT.safetensors OUT.plan
    python -m msld_export.plan_writing.export_plan --random --config export/msld_export/configs/lidc.json OUT.plan   # untrained
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import logging
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from msld_sdk import __version__ as sdk_version
from msld_sdk.checksums import sha256_file  # noqa: F401  (re-exported: export_plan.sha256_file)
from msld_sdk.plan import write_plan

from ..model.checkpoint import load_checkpoint, random_model
from ..model.config import ModelConfig
from ..model.networks import ExportDecoder, ExportDenoiser, ExportEncoder, MedSegLatDiff, alphas_cumprod
from .manifest import build_manifest
from .onnx_passes import group_norm_as_layer_norm
from ..training.training_input import training_input_for

OPSET = 18
RTOL = 1e-4


def _export(module: torch.nn.Module, args: tuple, in_names, out_names, dyn_inputs) -> bytes:
    """torch.onnx (dynamo exporter) with a dynamic batch axis on every input, then the graph
    rewrites of ``onnx_passes``; returns bytes."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic_shapes = {n: {0: batch} for n in dyn_inputs}
    f = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        torch.onnx.export(module.eval(), args, f, input_names=list(in_names), output_names=list(out_names),
                          dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET,
                          external_data=False, verbose=False)
    data = group_norm_as_layer_norm(f.getvalue())
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def _max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def export_graphs(model: MedSegLatDiff, check_batches=(1, 3, 8), seed: int = 0) -> tuple[dict, dict]:
    """Returns ({part: onnx bytes}, {part: max relative error vs PyTorch})."""
    cfg = model.cfg
    S, L = cfg.image_size, cfg.latent_size
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, cfg.image_channels, S, S, generator=g)
    lat = torch.randn(2, cfg.latent_channels, L, L, generator=g)
    t = torch.tensor([999.0, 10.0])
    parts = {
        "encoder": (ExportEncoder(model), (img,), ["image"], ["latent"], ["image"]),
        "denoiser": (ExportDenoiser(model), (lat, t, lat.clone()), ["x", "t", "cond"], ["eps"], ["x", "t", "cond"]),
        "decoder": (ExportDecoder(model), (lat,), ["z"], ["prob"], ["z"]),
    }
    return export_checked(parts, cfg.num_train_timesteps, check_batches, g)


def export_checked(parts: dict, num_train_timesteps: int, check_batches=(1, 3, 8),
                   g: torch.Generator | None = None) -> tuple[dict, dict]:
    """Export each part {name: (module, example args, input names, output names, dynamic inputs)}
    and check the ONNX graph against PyTorch on random inputs of every batch size in
    ``check_batches`` (1-d float inputs are timesteps in [0, num_train_timesteps)).
    Returns ({part: onnx bytes}, {part: max relative error vs PyTorch})."""
    g = g if g is not None else torch.Generator().manual_seed(0)
    graphs, errors = {}, {}
    for name, (mod, args, ins, outs, dyn) in parts.items():
        graphs[name] = _export(mod, args, ins, outs, dyn)
        sess = ort.InferenceSession(graphs[name], providers=["CPUExecutionProvider"])
        worst = 0.0
        for b in check_batches:
            feeds_t = [torch.randn(b, *a.shape[1:], generator=g) if a.dtype == torch.float32 and a.ndim > 1
                       else torch.randint(0, num_train_timesteps, (b,), generator=g).float() for a in args]
            with torch.no_grad():
                ref = mod(*feeds_t).numpy()
            got = sess.run(None, {n: v.numpy() for n, v in zip(ins, feeds_t)})[0]
            worst = max(worst, _max_rel_err(got, ref))
        if worst > RTOL:
            raise RuntimeError(f"ONNX {name} disagrees with PyTorch: max relative error {worst:.2e} > {RTOL}")
        errors[name] = worst
    return graphs, errors


def manifest_for(cfg: ModelConfig, provenance: dict) -> dict:
    """The manifest of a plan of this package's own model (``manifest.build_manifest``)."""
    L = cfg.latent_size
    return build_manifest(
        model=cfg.to_dict(),
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start, beta_end=cfg.beta_end, alphas_cumprod=alphas_cumprod(cfg).numpy(),
        spacing="trailing", clip_sample=0.0,
        image_size=cfg.image_size, image_channels=cfg.image_channels, mean=cfg.image_mean, std=cfg.image_std,
        latent_channels=cfg.latent_channels, latent_size=(L, L),
        k=cfg.default_k, steps=cfg.default_steps, max_k=cfg.max_k,
        provenance=provenance, training_input=training_input_for(cfg.name))


def export_plan(model: MedSegLatDiff, out: str | Path, provenance: dict | None = None) -> dict:
    """Export, verify and write a plan; returns the manifest (with the ONNX-vs-PyTorch errors)."""
    graphs, errors = export_graphs(model)
    prov = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "msld_sdk": sdk_version, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnx_opset": OPSET, "host": platform.machine(),
        "onnx_vs_torch_max_rel_err": errors,
    }
    prov.update(provenance or {})
    blobs = {name: (f"graphs/{name}.onnx", data) for name, data in graphs.items()}
    return write_plan(out, manifest_for(model.cfg, prov), blobs)


def main(argv=None) -> int:
    from msld_sdk.cli.options import Formatter, add_overwrite_arg
    from msld_sdk.errors import UsageError
    from msld_sdk.writing import check_output_file

    ap = argparse.ArgumentParser(prog="msld export", description="Export a checkpoint to a plan file.",
                                 formatter_class=Formatter)
    ap.add_argument("checkpoint", nargs="?", help="safetensors checkpoint written by msld_export.training.train")
    ap.add_argument("out", nargs="?", help="plan file to write (e.g. engine.plan); or --out")
    ap.add_argument("-o", "--out", dest="out_opt", default=None, help="plan file to write (default: the positional)")
    add_overwrite_arg(ap)
    ap.add_argument("--random", action="store_true", help="export an untrained model (for tests/demos)")
    ap.add_argument("--config", help="model config JSON (with --random; default: the default ModelConfig)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed with --random")
    a = ap.parse_args(argv)
    given = [x for x in (a.checkpoint, a.out) if x is not None]
    if a.out_opt is not None:      # --out: a positional, if any, is the checkpoint
        if len(given) > 1:
            ap.error("give the plan file once: as --out or as the last positional, not both")
        a.checkpoint, a.out = (given[0] if given else None), a.out_opt
    elif len(given) == 1:          # one positional: the plan file (with --random) or a checkpoint without a plan
        if not a.random:
            ap.error("give the plan file to write: msld export CHECKPOINT OUT.plan (or --out OUT.plan)")
        a.checkpoint, a.out = None, given[0]
    elif not given:
        ap.error("give the plan file to write: --out OUT.plan")
    if not a.random and (a.config is not None or a.seed != 0):
        ap.error("--config and --seed apply to --random only (a checkpoint carries its own config and weights)")
    check_output_file(a.out, [a.checkpoint, a.config], a.overwrite)   # before any work (docs/outputs.md)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if a.random:
        try:
            cfg = ModelConfig.load(a.config) if a.config else ModelConfig()
        except (ValueError, TypeError, KeyError) as e:   # JSONDecodeError is a ValueError
            raise UsageError(f"--config {a.config}: not a model config JSON ({type(e).__name__}: {e}); "
                             "msld export --random takes msld_export's ModelConfig as JSON, not a Hydra YAML "
                             "(those go through msld import)") from e
        model = random_model(cfg, a.seed)
        prov = {"checkpoint": None, "trained": False, "random_seed": a.seed,
                "note": f"untrained random weights, seed {a.seed}"}
    else:
        if not a.checkpoint:
            ap.error("give a checkpoint, or --random")
        model, info = load_checkpoint(a.checkpoint)
        prov = {"checkpoint": Path(a.checkpoint).name, "checkpoint_sha256": sha256_file(Path(a.checkpoint)),
                "trained": True, "training": info}
    m = export_plan(model, a.out, prov)
    errs = ", ".join(f"{k} {v:.1e}" for k, v in m["provenance"]["onnx_vs_torch_max_rel_err"].items())
    size = Path(a.out).stat().st_size
    print(f"wrote {a.out} ({size / 1e6:.1f} MB); ONNX vs PyTorch max relative error: {errs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
