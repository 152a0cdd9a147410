"""Dice versus the number of DDIM steps on a validation split (the paper's Figure 4).

    python -m msld_export.training.dice_vs_steps --plan msld_sdk/models/lidc.plan --kind lidc \
        --steps 1 2 5 10 20 50 100 --out benchmarks/results/dice_vs_steps_lidc

Writes OUT.csv (one row per step count: Dice/IoU of the consensus and mean mask, GED/HM-IoU
where there are several annotators, ECE, seconds) and OUT.png. The shipped default number of
steps is chosen from this curve.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from msld_sdk import Segmenter
from msld_sdk.evaluation.evaluate import Sample, evaluate

from .data import load_split

STEPS = (1, 2, 5, 10, 20, 50, 100)


def curve(plan, kind: str, data_root, steps=STEPS, k: int = 8, seed: int = 0, limit: int | None = None,
          split: str = "val") -> list[dict]:
    seg = Segmenter(plan)
    data = load_split(kind, data_root, split, seg.plan.image_size[0], limit=limit)
    rows = []
    for s in steps:
        samples = (Sample(data.images[i].transpose(1, 2, 0).astype(np.float32) / 255.0, data.masks[i] > 0)
                   for i in range(len(data)))
        rep = evaluate(seg, samples, k=k, steps=s, seed=seed)
        row = {"steps": s, **{k_: round(v, 5) for k_, v in rep["metrics"].items()},
               "ece": round(rep["ece"], 5), "seconds": round(rep["seconds"], 1), "n_images": rep["n_images"]}
        rows.append(row)
        print(row, flush=True)
    return rows


def write(rows: list[dict], out: str | Path, title: str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    x = [r["steps"] for r in rows]
    for key, label in (("dice_consensus", "Dice (consensus)"), ("dice_mean_mask", "Dice (mean mask)"),
                       ("dice_per_hypothesis", "Dice (per hypothesis)")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel("DDIM steps")
    ax.set_ylabel("Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msld_export.training.dice_vs_steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--kind", required=True, choices=["lidc", "polyp", "kvasir", "cvc"])
    ap.add_argument("--data", default=None, help="data root (default ../shared/data)")
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N validation items only")
    ap.add_argument("--out", required=True, help="output path without suffix (.csv and .png are written)")
    a = ap.parse_args(argv)
    rows = curve(a.plan, a.kind, a.data, a.steps, a.k, a.seed, a.limit)
    n = rows[0]["n_images"]
    write(rows, a.out, f"{Path(a.plan).name}: {a.kind} val ({n} images), k={a.k}, seed {a.seed}")
    print(f"wrote {Path(a.out).with_suffix('.csv')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
