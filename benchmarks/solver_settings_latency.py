"""Latency of a plan at two or more sampler settings, interleaved in one process, so that the
ratio holds on a busy machine: e.g. a shipped plan's old default against its new one.

    python -m benchmarks.solver_settings_latency lidc ddim:20 dpmpp2m:6 [--k 8] [--repeats 5] [--json FILE]

Each repeat runs every setting once on the same image and seed (one warm-up run each first);
prints the median per setting and its ratio to the first setting.
"""
import argparse
import functools
import json
import statistics

import numpy as np

from msld_sdk import Segmenter
from msld_sdk.evaluation.tune import parse_settings
from msld_sdk.tools.bench import machine_info, time_interleaved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("settings", nargs="+", help="SOLVER:STEPS, the first is the one compared with")
    ap.add_argument("--k", type=int, default=None, help="hypotheses (default: the plan's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    settings = [s for text in a.settings for s in parse_settings(text)]
    seg = Segmenter(a.plan, backend="onnxruntime", threads=a.threads, precision=a.precision)
    k = a.k or seg.defaults["k"]
    size, channels = seg.plan.image_size, seg.plan.channels
    img = np.random.default_rng(0).random((*size, channels) if channels > 1 else size, dtype=np.float32)

    times = time_interleaved({s: functools.partial(seg.run, img, k=k, steps=s.steps, solver=s.solver, seed=0)
                              for s in settings}, a.repeats)
    first = statistics.median(times[settings[0]])
    rows = [{"solver": s.solver, "steps": s.steps, "median_ms": statistics.median(t), "runs_ms": t,
             "speedup_vs_first": first / statistics.median(t)} for s, t in times.items()]
    for r in rows:
        print(f"{r['solver']}:{r['steps']:<4} median {r['median_ms']:8.1f} ms   {r['speedup_vs_first']:.2f}x")
    if a.json:
        machine = machine_info(getattr(seg.backend, "threads", a.threads or 0), seg.plan)
        with open(a.json, "w") as f:
            json.dump({"plan": str(seg.plan.path), "k": k, "precision": a.precision, "repeats": a.repeats,
                       "machine": machine, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
