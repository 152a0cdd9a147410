"""Why the SDK's ONNX Runtime sessions stop spinning between runs (session_options).

Times the SDK's sequence of calls (encoder once, the denoiser `--steps` times at batch k,
decoder once) on three sessions made with ONNX Runtime's default settings and on three made
with the SDK's, interleaved in one process so that machine noise hits both alike:

    python -m benchmarks.ort_session_settings [--plan lidc] [--k 8] [--steps 20] [--json FILE]
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

from msld_sdk.backends.onnxruntime_backend import session_options
from msld_sdk.plan import Plan
from msld_sdk.segmenter import resolve_plan_path


def sessions(plan: Plan, opts: ort.SessionOptions) -> dict:
    return {p: ort.InferenceSession(plan.blob(p), opts, providers=["CPUExecutionProvider"])
            for p in ("encoder", "denoiser", "decoder")}


def one_run(s: dict, img, x, t, cond, steps: int) -> dict:
    t0 = time.perf_counter()
    s["encoder"].run(None, {"image": img})
    t1 = time.perf_counter()
    for _ in range(steps):
        s["denoiser"].run(None, {"x": x, "t": t, "cond": cond})
    t2 = time.perf_counter()
    s["decoder"].run(None, {"z": x})
    t3 = time.perf_counter()
    return {"total_ms": 1e3 * (t3 - t0), "denoise_per_step_ms": 1e3 * (t2 - t1) / steps, "decode_ms": 1e3 * (t3 - t2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="lidc")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    plan = Plan.open(resolve_plan_path(a.plan))
    tuned = session_options(a.threads)
    default = ort.SessionOptions()
    default.intra_op_num_threads = tuned.intra_op_num_threads  # the same thread count, ORT's defaults otherwise
    ways = {"onnxruntime_defaults": sessions(plan, default), "sdk_settings": sessions(plan, tuned)}
    rng = np.random.default_rng(0)
    c, (h, w) = plan.manifest["latent"]["channels"], plan.manifest["latent"]["size"]
    x = rng.standard_normal((a.k, c, h, w), dtype=np.float32)
    cond = rng.standard_normal((a.k, c, h, w), dtype=np.float32)
    t = np.full((a.k,), 500.0, np.float32)
    img = rng.standard_normal((1, plan.channels, *plan.image_size), dtype=np.float32)
    runs = {name: [] for name in ways}
    for i in range(a.repeats + 1):
        for name, s in ways.items():
            time.sleep(0.3)  # let the other way's threads go idle first
            r = one_run(s, img, x, t, cond, a.steps)
            if i:  # the first round is a warm-up
                runs[name].append(r)
    report = {"plan": a.plan, "k": a.k, "steps": a.steps, "threads": tuned.intra_op_num_threads,
              "onnxruntime": ort.__version__, "repeats": a.repeats}
    for name, rs in runs.items():
        report[name] = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        m = report[name]
        print(f"{name:22s} total {m['total_ms']:6.1f} ms | denoiser call {m['denoise_per_step_ms']:5.2f} ms "
              f"| decoder {m['decode_ms']:5.1f} ms")
    report["speedup_total"] = report["onnxruntime_defaults"]["total_ms"] / report["sdk_settings"]["total_ms"]
    print(f"SDK settings: {report['speedup_total']:.2f}x faster over the whole sequence")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
