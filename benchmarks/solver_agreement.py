"""How far a solver setting moves the masks from a reference setting when both start from the
same initial noise: the ODE both integrate is the same, so the gap is the solver's own error.

    python -m benchmarks.solver_agreement PLAN --kind lidc --per-nodule --limit 60 -k 16 \\
        --reference ddim:50 --settings dpmpp2m:10,6 ddim:10 [--precision int8] --json out.json

Every setting (and, with ``--precision int8``, the reference run again in int8) is run on the
same images with the same initial latents (drawn once from ``--seed``); printed per setting:
mean and max |probability difference| and the share of mask pixels (threshold of the plan) that
equal the reference's. ``msld tune`` asks the other question (figures within the seed spread).
"""
from __future__ import annotations

import argparse
import json
import platform

import numpy as np

from msld_sdk import Segmenter
from msld_sdk.evaluation.datasets import default_data_root, load_split, middle_slice_per_nodule


def parse_settings(tokens: list[str]) -> list[tuple[str, int]]:
    """'dpmpp2m:10,6' 'ddim:10' -> [('dpmpp2m', 10), ('dpmpp2m', 6), ('ddim', 10)]."""
    out = []
    for tok in tokens:
        solver, _, steps = tok.partition(":")
        out += [(solver, int(s)) for s in steps.split(",") if s]
    return out


def load_images(plan, kind: str = "lidc", data=None, split: str = "val", limit=None, per_nodule: bool = False):
    """The split's images as the plan takes them (H x W, or H x W x C), floats in [0, 1]."""
    ds = load_split(kind, data or default_data_root(), split, plan.image_size[0], limit=limit, channels=plan.channels)
    if per_nodule:
        ds = middle_slice_per_nodule(ds)
    return [np.moveaxis(ds[i]["image"], 0, -1).squeeze(-1) if ds.image_channels == 1
            else np.moveaxis(ds[i]["image"], 0, -1) for i in range(len(ds))]


def plan_graphs(seg: Segmenter):
    """``(encode, denoiser, decoder)`` of ``seg``'s plan as bare ONNX Runtime CPU sessions, for
    probes that step a sampler themselves; ``encode(img)`` normalises the image as the plan says
    and returns its condition latent (1, C, h, w)."""
    import onnxruntime as ort
    plan = seg.plan
    mk = lambda name: ort.InferenceSession(plan.blob(name), providers=["CPUExecutionProvider"])
    enc = mk("encoder")
    mean, std = (np.asarray(plan.manifest["input"][k], np.float32)[:, None, None] for k in ("mean", "std"))

    def encode(img: np.ndarray) -> np.ndarray:
        chw = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
        return enc.run(None, {"image": ((chw - mean) / std)[None].astype(np.float32)})[0]

    return encode, mk("denoiser"), mk("decoder")


def compare(p: np.ndarray, ref: np.ndarray, threshold: float) -> dict:
    """mean / max |p - ref| and the share of pixels on the same side of ``threshold``."""
    d = np.abs(p - ref)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
            "mask_pixels_equal": float(((p > threshold) == (ref > threshold)).mean())}


def run_probs(seg: Segmenter, images, latents, k: int, solver: str, steps: int) -> np.ndarray:
    """[n*k, H, W] foreground probabilities, the hypotheses of image i at rows i*k..i*k+k-1; one
    image a call (a list of n images is one batch of n*k, whose ONNX Runtime arena stays)."""
    return np.concatenate([seg.run(im, k=k, steps=steps, solver=solver, initial_latents=latents[i * k:(i + 1) * k],
                                   eta=0.0).probs for i, im in enumerate(images)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("--kind", default="lidc")
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--per-nodule", action="store_true")
    ap.add_argument("-k", type=int, default=16)
    ap.add_argument("--reference", default="ddim:50")
    ap.add_argument("--settings", nargs="+", default=["dpmpp2m:10,6", "ddim:10"])
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                    help="precision of the compared settings (the reference always runs fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    ref_seg = Segmenter(a.plan, backend="onnxruntime", threads=a.threads)
    seg = ref_seg if a.precision == "fp32" else Segmenter(a.plan, backend="onnxruntime", precision="int8",
                                                          threads=a.threads)
    plan = ref_seg.plan
    images = load_images(plan, a.kind, a.data, a.split, a.limit, a.per_nodule)
    latents = np.random.default_rng(a.seed).standard_normal((len(images) * a.k, *plan.latent_shape),
                                                           dtype=np.float32)
    thr = float(plan.defaults.get("threshold", 0.5))
    (rs, rn), = parse_settings([a.reference])
    ref = run_probs(ref_seg, images, latents, a.k, rs, rn)
    settings = parse_settings(a.settings) + ([(rs, rn)] if a.precision == "int8" else [])
    rows = []
    print(f"{a.plan}: {len(images)} images x k={a.k}, same initial latents (seed {a.seed}); "
          f"reference {rs} {rn} fp32; compared in {a.precision}")
    print(f"{'setting':<14} {'mean |dp|':>10} {'max |dp|':>9} {'mask pixels equal':>18}")
    for solver, steps in settings:
        p = run_probs(seg, images, latents, a.k, solver, steps)
        row = {"solver": solver, "steps": steps, "precision": a.precision, **compare(p, ref, thr)}
        rows.append(row)
        print(f"{solver + ' ' + str(steps):<14} {row['mean_abs']:>10.2e} {row['max_abs']:>9.3f} "
              f"{100 * row['mask_pixels_equal']:>17.3f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"plan": a.plan, "plan_graphs_sha256": plan.graphs_sha256, "kind": a.kind,
                       "split": a.split, "limit": a.limit, "per_nodule": a.per_nodule, "images": len(images),
                       "k": a.k, "seed": a.seed, "reference": {"solver": rs, "steps": rn, "precision": "fp32"},
                       "rows": rows, "machine": platform.processor() or platform.machine()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
