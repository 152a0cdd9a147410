"""Where on LIDC a sampler setting gains or loses GED / HM-IoU against a reference setting:
the protocol's per-nodule figures, paired by nodule and seed, grouped by how many of the four
annotators marked the slice (0-4). Reads the JSON files `scripts/eval_seeds.sh` wrote; runs nothing.

    python -m benchmarks.lidc_agreement_groups [--results DIR] [--reference steps50] \\
        [--settings dpmpp2m_steps6 dpmpp2m_steps8 ...] [--seeds 0 1 2]

"contributes" is the group's share of the whole-protocol mean difference (group mean x group size /
all nodules), so the contributions of a setting add up to its protocol difference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from msld_sdk.evaluation.datasets import default_data_root, load_split, middle_slice_per_nodule

RESULTS = Path("benchmarks/results/eval_seeds_lidc_k16_per_nodule")


def annotators_marking(data) -> dict[str, int]:
    """id -> how many annotators drew any foreground on that slice."""
    return {i: int(n) for i, n in zip(data.ids, data.nonempty().sum(axis=1))}


def per_nodule(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(path.read_text())["per_image"]}


def group_differences(run: list[dict], ref: list[dict], marked: dict[str, int], metric: str) -> dict[int, tuple]:
    """marked count -> (nodules, mean difference over nodules and seeds, contribution)."""
    out = {}
    for m in sorted(set(marked.values())):
        ids = [i for i, n in marked.items() if n == m]
        d = float(np.mean([[r[i][metric] - f[i][metric] for i in ids] for r, f in zip(run, ref)]))
        out[m] = (len(ids), d, d * len(ids) / len(marked))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--data", default=None, help="data root (default: ../shared/data)")
    ap.add_argument("--reference", default="steps50", help="file prefix of the reference setting")
    ap.add_argument("--settings", nargs="+", default=["steps20", "dpmpp2m_steps20", "dpmpp2m_steps8",
                                                      "dpmpp2m_steps6", "dpmpp2m_steps4"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a = ap.parse_args(argv)
    data = middle_slice_per_nodule(load_split("lidc", a.data or default_data_root(), split="val", image_size=128))
    marked = annotators_marking(data)

    def load(name):
        return [per_nodule(a.results / f"{name}_seed{s}_fp32.json") for s in a.seeds]

    ref = load(a.reference)
    if set(ref[0]) != set(marked):
        raise SystemExit(f"{a.results}: the files' nodules are not the protocol's {len(marked)}")
    print(f"minus {a.reference}, paired by nodule and seed ({', '.join(map(str, a.seeds))}); {len(marked)} nodules")
    for name in a.settings:
        run = load(name)
        print(name)
        groups = {m: group_differences(run, ref, marked, m) for m in ("hm_iou", "ged")}
        for m, (n, dh, ch) in groups["hm_iou"].items():
            _, dg, cg = groups["ged"][m]
            print(f"  {m} of 4 marked, {n:3d} nodules: HM-IoU {dh:+.4f} (contributes {ch:+.4f}),"
                  f" GED {dg:+.4f} (contributes {cg:+.4f})")
        print(f"  all: HM-IoU {sum(c for _, _, c in groups['hm_iou'].values()):+.4f},"
              f" GED {sum(c for _, _, c in groups['ged'].values()):+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
