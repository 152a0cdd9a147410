"""The ``msld`` command: segment images, inspect plans, export checkpoints."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .errors import MsldError


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, help="plan file or shipped model name (default: the embedded lidc model)")
    p.add_argument("-k", "--k", type=int, default=None, help="number of hypotheses (default: the plan's)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the plan's)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible hypotheses (default: random, printed)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic given the seed, 1 = DDPM-like")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")


def cmd_segment(a) -> int:
    from PIL import Image

    from .image_input import load_image
    from .segmenter import Segmenter
    from .visualize import heatmap, overlay

    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, progress=not a.quiet)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in a.images:
        r = seg.run(path, k=a.k, steps=a.steps, seed=a.seed, eta=a.eta)
        d = out / Path(path).stem if len(a.images) > 1 else out
        d.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(r.masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(d / f"mask_{i:02d}.png")
        Image.fromarray((r.mean * 255 + 0.5).astype(np.uint8)).save(d / "mean.png")
        Image.fromarray((r.consensus.astype(np.uint8) * 255)).save(d / "consensus.png")
        Image.fromarray(heatmap(r.confidence)).save(d / "confidence.png")
        Image.fromarray(overlay(load_image(path), r.mean, r.consensus)).save(d / "overlay.png")
        fg = float(r.consensus.mean())
        print(f"{path}: k={r.k} steps={r.steps} seed={r.seed} -> {d}/ "
              f"(consensus foreground {100 * fg:.2f}% of pixels, mean confidence {float(r.confidence.mean()):.3f}, "
              f"{r.timings['total_ms']:.0f} ms)")
    return 0


def cmd_info(a) -> int:
    from .plan import Plan
    from .segmenter import resolve_plan_path

    plan = Plan.open(resolve_plan_path(a.plan))
    if a.json:
        m = dict(plan.manifest)
        m["schedule"] = {k: v for k, v in m["schedule"].items() if k != "alphas_cumprod"}
        print(json.dumps(m, indent=1, sort_keys=True))
    else:
        print(plan.summary())
    return 0


def cmd_build(a) -> int:
    from .engine_build import build_engines
    from .segmenter import resolve_plan_path

    build_engines(resolve_plan_path(a.plan), a.out, fp32=a.fp32, k_max=a.k_max, opt_k=a.opt_k,
                  compute_capabilities=a.compute_capability, timing_cache=a.timing_cache,
                  progress=not a.quiet)
    return 0


def cmd_export(a, rest) -> int:
    # export/ is a sibling of msld_sdk/ in the repository (it needs torch; the runtime does not).
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "export" / "export_plan.py").exists() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        import torch  # noqa: F401
        from export.export_plan import main as export_main
    except ImportError as e:
        print(f"msld export needs PyTorch and the repository's export/ package ({e}); "
              "install with: pip install -e '.[export]' and run from the repository root", file=sys.stderr)
        return 2
    return export_main(rest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="msld", description="MedSegLatDiff: k plausible segmentations, their mean "
                                 "and a confidence map.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log which backend runs and why")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("segment", parents=[common], help="segment images; write k masks, mean, confidence heat map and overlay as PNG")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, TIFF, NPY)")
    p.add_argument("-o", "--out", default="msld_out", help="output folder (default: msld_out)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_run_args(p)

    p = sub.add_parser("info", parents=[common], help="print a plan's manifest")
    p.add_argument("plan", nargs="?", default=None, help="plan file or shipped model name (default: lidc)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    p = sub.add_parser("build", parents=[common], help="build TensorRT engines for a plan and store them in it "
                       "(needs tensorrt-rtx-cu13 or tensorrt; TensorRT-RTX builds without a GPU)")
    p.add_argument("plan", help="plan file (or shipped model name); engines are added to it unless --out is given")
    p.add_argument("--out", default=None, help="write the plan with engines here instead of in place")
    p.add_argument("--fp32", action="store_true", help="fp32 engines (default: fp16 convolutions/matmuls)")
    p.add_argument("--k-max", type=int, default=32, help="largest denoiser/decoder batch, images x k (default: 32)")
    p.add_argument("--opt-k", type=int, default=8, help="batch the engines are tuned for (default: 8)")
    p.add_argument("--compute-capability", nargs="+", action="extend", default=None, metavar="CC",
                   help="GPU compute capabilities to target, e.g. 8.6 8.9 (TensorRT-RTX; default: all it "
                        "supports from 8.0; full TensorRT: the local GPU)")
    p.add_argument("--timing-cache", default=None, metavar="PATH",
                   help="timing cache file (default: OUT.timing.cache; used where the TensorRT flavour has one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    sub.add_parser("export", help="checkpoint -> plan (needs PyTorch); `msld export --help` for options",
                   add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return cmd_export(None, argv[1:])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    try:
        return {"segment": cmd_segment, "info": cmd_info, "build": cmd_build}[a.cmd](a)
    except MsldError as e:
        print(f"msld: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
