"""One denoiser call at batch 1, the reference loop's unit of work: the plan's PyTorch module
(eager, float32; what `msld bench --baselines` runs as (a) and the reference default) against
its fp32 graph in ONNX Runtime with the SDK's session settings, interleaved in one process,
at each thread count given. It tells how much of a ratio to (a) is PyTorch's own speed on the
machine, e.g. under contention, rather than the SDK's batching, solver or int8:

    python -m benchmarks.denoiser_batch1_torch_vs_ort PLAN [--threads 1 2] [--repeats 10] [--json FILE]

PLAN: a reference-family plan (`msld import`, `python -m msld_export.reference.bench_plan`).
"""
import argparse
import json
import statistics

import onnxruntime as ort
import torch

from msld_export.sampling.baselines import is_reference_plan, torch_model_for_plan
from msld_sdk.backends.onnxruntime_backend import session_options
from msld_sdk.plan import Plan
from msld_sdk.segmenter import resolve_plan_path
from msld_sdk.tools.bench import load_average, time_interleaved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", help="a reference-family plan (msld import, bench_plan)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10, help="interleaved calls of each, after one warm-up")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    plan = Plan.open(resolve_plan_path(a.plan))
    if not is_reference_plan(plan):
        raise SystemExit(f"{plan.path}: not a reference-family plan")
    denoiser = torch_model_for_plan(plan).denoiser   # checked against the plan's graphs
    m = plan.manifest
    C, (L, _) = m["latent"]["channels"], m["latent"]["size"]
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, C, L, L, generator=g), torch.randn(1, m["condition"]["channels"], L, L, generator=g)
    t = torch.tensor([500.0])
    out = {"plan": plan.path, "torch": torch.__version__, "onnxruntime": ort.__version__,
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_start": load_average()}
    for threads in a.threads:
        torch.set_num_threads(threads)
        s = ort.InferenceSession(plan.blob("denoiser"), session_options(threads), providers=["CPUExecutionProvider"])
        feeds = {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy()}
        calls = {"torch": lambda: denoiser(x, t, cond), "ort": lambda: s.run(None, feeds)}
        with torch.no_grad():
            ts = time_interleaved(calls, a.repeats)
        med = {n: statistics.median(v) for n, v in ts.items()}
        out[f"threads_{threads}"] = {"torch_ms": med["torch"], "ort_ms": med["ort"],
                                     "torch_over_ort": med["torch"] / med["ort"],
                                     "torch_all_ms": ts["torch"], "ort_all_ms": ts["ort"]}
        print(f"{threads} thread(s): PyTorch eager {med['torch']:.1f} ms, ONNX Runtime {med['ort']:.1f} ms "
              f"= {med['torch'] / med['ort']:.2f}x", flush=True)
    out["load_average_end"] = load_average()
    print(f"load average (1, 5, 15 min) {out['load_average_start']} at the start, {out['load_average_end']} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
