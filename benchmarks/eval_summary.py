"""Summarise the ``msld eval`` results written by ``scripts/eval_seeds.sh``.

    python -m benchmarks.eval_summary benchmarks/results/eval_seeds_lidc

Files: ``steps{N}_seed{S}_{fp32|int8}.json`` (DDIM) and ``{solver}_steps{N}_seed{S}_{prec}.json``
(other solvers, e.g. dpmpp2m; ``dpmpp2m@rho2``: on the power timestep grid of rho 2;
``dpmpp2m@linspace_trunc``: on another spacing rule's grid). For every (solver, steps, precision): each metric's mean and
standard deviation over the seeds, and a difference paired by seed (same seed, so the same
per-image noise): fp32 of any solver and step count minus the reference, DDIM fp32 at the largest
DDIM step count (or ``--ref-steps``); int8 minus fp32 of the same solver and steps. Each
comparison says whether it is within the compared-with setting's seed spread, by the rule of
``msld_sdk.evaluation.seed_spread`` (the one ``msld tune`` applies).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics as st
from pathlib import Path

from msld_sdk.errors import UsageError
from msld_sdk.evaluation.seed_spread import RULE, compare
from msld_sdk.plan import SPACINGS

KEYS = ["dice_consensus", "iou_consensus", "dice_per_hypothesis", "ged", "hm_iou"]
GRID = "|".join(["rho[0-9.]+", *SPACINGS])   # dpmpp2m@rho2, dpmpp2m@linspace_trunc, ...
NAME = re.compile(rf"^(?:([a-z][a-z0-9]*(?:@(?:{GRID}))?)_)?steps(\d+)_seed(\d+)_(fp32|int8)\.json$")


def load(folder) -> dict:
    """{(solver, steps, precision): {seed: {metric: value}}}, "marked/" metrics on majority-marked slices."""
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
        runs.setdefault((m[1] or "ddim", int(m[2]), m[4]), {})[int(m[3])] = row
    return runs


def compared_with(key: tuple, ref_steps: int) -> tuple:
    """What a setting is compared with: fp32 -> DDIM fp32 at ``ref_steps``; int8 -> fp32 of its solver and steps."""
    solver, steps, prec = key
    return ("ddim", ref_steps, "fp32") if prec == "fp32" else (solver, steps, "fp32")


def _title(key: tuple) -> str:
    solver, steps, prec = key
    return f"{prec} {steps} steps" if solver == "ddim" else f"{solver} {prec} {steps} steps"


def summarise(runs: dict, ref_steps: int | None = None) -> list[str]:
    if not runs:
        return ["no results"]
    ddim_steps = [s for sv, s, p in runs if sv == "ddim" and p == "fp32"]
    if ref_steps is None and not ddim_steps:
        return ["no DDIM fp32 results to compare with: give --ref-steps and evaluate DDIM fp32 at that step count"]
    ref_steps = ref_steps or max(ddim_steps)
    lines = [f"differences paired by seed: fp32 minus fp32 at {ref_steps} steps (DDIM, the reference); "
             "int8 minus fp32 of the same solver and steps",
             f"within (msld_sdk.evaluation.seed_spread, with the compared-with setting as reference): {RULE}"]
    for key, by_seed in sorted(runs.items(), key=lambda kv: (kv[0][0] != "ddim", kv[0])):
        seeds = sorted(by_seed)
        lines.append(f"{_title(key)}, seeds {' '.join(map(str, seeds))}:")
        ref = runs.get(compared_with(key, ref_steps), {})
        for k in by_seed[seeds[0]]:
            vals = [by_seed[s][k] for s in seeds]
            sd = f" sd {st.stdev(vals):.4f}" if len(vals) > 1 else ""
            line = f"  {k:26s} mean {st.mean(vals):.4f}{sd}"
            paired = [by_seed[s][k] - ref[s][k] for s in seeds if s in ref and k in ref[s]]
            if paired and key != ("ddim", ref_steps, "fp32"):
                line += f" | minus reference: {' '.join(f'{d:+.4f}' for d in paired)} mean {st.mean(paired):+.4f}"
                try:
                    c = compare(by_seed, ref, k)
                    line += f" | within its sd {c.ref_sd:.4f}: {'yes' if c.within else 'NO'}"
                except UsageError:
                    line += " | within: needs 2 shared seeds"
            lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--ref-steps", type=int, help="reference DDIM step count (default: the largest evaluated)")
    a = ap.parse_args(argv)
    print("\n".join(summarise(load(a.folder), a.ref_steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
