"""Summarise the ``msld eval`` results written by ``scripts/eval_seeds.sh``.

    python -m benchmarks.eval_summary benchmarks/results/eval_seeds_lidc

For every (steps, precision): each metric's mean and standard deviation over the seeds, and a
difference paired by seed (same seed, so the same per-image noise): fp32 at other step counts
minus fp32 at the reference step count; int8 minus fp32 at the same step count.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics as st
from pathlib import Path

KEYS = ["dice_consensus", "iou_consensus", "dice_per_hypothesis", "ged", "hm_iou"]
NAME = re.compile(r"steps(\d+)_seed(\d+)_(fp32|int8)\.json$")


def load(folder) -> dict:
    """{(steps, precision): {seed: {metric: value}}}, "marked/" metrics on majority-marked slices."""
    runs: dict = {}
    for f in sorted(Path(folder).glob("*.json")):
        m = NAME.search(f.name)
        if not m:
            continue
        r = json.loads(f.read_text())
        row = {k: v for k, v in r["metrics"].items() if k in KEYS}
        row["ece"] = r["ece"]
        for k, v in r.get("majority_marked", {}).get("metrics", {}).items():
            if k in KEYS:
                row["marked/" + k] = v
        runs.setdefault((int(m[1]), m[3]), {})[int(m[2])] = row
    return runs


def summarise(runs: dict, ref_steps: int | None = None) -> list[str]:
    if not runs:
        return ["no results"]
    ref_steps = ref_steps or max(s for s, p in runs if p == "fp32")
    lines = [f"differences paired by seed: fp32 minus fp32 at {ref_steps} steps; int8 minus fp32 at its steps"]
    for (steps, prec), by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        lines.append(f"{prec} {steps} steps, seeds {' '.join(map(str, seeds))}:")
        for k in by_seed[seeds[0]]:
            vals = [by_seed[s][k] for s in seeds]
            sd = f" sd {st.stdev(vals):.4f}" if len(vals) > 1 else ""
            line = f"  {k:26s} mean {st.mean(vals):.4f}{sd}"
            ref = runs.get((ref_steps if prec == "fp32" else steps, "fp32"), {})
            paired = [by_seed[s][k] - ref[s][k] for s in seeds if s in ref and k in ref[s]]
            if paired and (steps, prec) != (ref_steps, "fp32"):
                line += (f" | minus reference: {' '.join(f'{d:+.4f}' for d in paired)} mean {st.mean(paired):+.4f}")
            lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--ref-steps", type=int, help="reference step count (default: the largest evaluated)")
    a = ap.parse_args(argv)
    print("\n".join(summarise(load(a.folder), a.ref_steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
