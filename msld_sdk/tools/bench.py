"""Latency benchmark of the SDK (``msld bench``): medians, p90, stage shares, GFLOP/s vs the machine.

Everything here runs without torch. The research-code baselines that need torch live in
``export/msld_export/sampling/baselines.py`` and are measured in the same process when asked for.
"""
from __future__ import annotations

import functools
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from .flops import graph_flops

STAGES = ("preprocess_ms", "encode_ms", "denoise_ms", "loop_overhead_ms", "decode_ms", "postprocess_ms",
          "aggregate_ms")


def percentile(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q))


def time_calls(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_interleaved(calls: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of each of ``calls`` ({name: fn}), ``warmup`` untimed calls each first, then
    ``repeats`` rounds calling each once in turn, so that machine noise hits all of them alike."""
    for fn in calls.values():
        time_calls(fn, 0, warmup)
    out = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            out[name] += time_calls(fn, 1, warmup=0)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM where /proc has it (Linux; reset at exec), else
    ru_maxrss (which on Linux carries the parent's peak over fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gemm_gflops(threads: int, n: int = 1024, repeats: int = 30) -> float:
    """fp32 GEMM rate of this machine through ONNX Runtime's MatMul (the same MLAS kernels
    its Conv uses), with the same thread count as the SDK."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    from ..backends.onnxruntime_backend import session_options
    s = ort.InferenceSession(m.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    ms = time_calls(lambda: s.run(None, feeds), repeats, warmup=3)
    return 2 * n ** 3 / (min(ms) * 1e-3) / 1e9  # the best run: the machine's ceiling, not its noise


def bench_sdk(seg, img, k: int, steps: int, repeats: int, seed: int = 0, warmup: int = 1,
              solver: str | None = None) -> dict:
    """Median/p90 latency and mean stage times of ``seg.run(img, k, steps, seed, solver)``
    (``solver`` None: the plan's default)."""
    results = []

    def call():
        results.append(seg.run(img, k=k, steps=steps, seed=seed, **({} if solver is None else {"solver": solver})))

    for _ in range(warmup):
        call()
    results.clear()
    totals = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        totals.append((time.perf_counter() - t0) * 1e3)
    stages = {s: statistics.mean(r.timings[s] for r in results) for s in STAGES}
    ort_ms = stages["encode_ms"] + stages["denoise_ms"] + stages["decode_ms"]
    med = statistics.median(totals)
    return {
        "k": k, "steps": steps, "solver": results[0].solver if results else solver, "repeats": repeats,
        "median_ms": med, "p90_ms": percentile(totals, 90), "min_ms": min(totals),
        "hypotheses_per_s": k / (med * 1e-3),
        "stages_ms": stages,
        "stage_share": {s: v / statistics.mean(totals) for s, v in stages.items()},
        # everything outside the ONNX Runtime calls: preprocessing, the native DDIM updates and
        # noise, Python callbacks, resizing, aggregation
        "overhead_fraction": max(0.0, 1.0 - ort_ms / statistics.mean(totals)),
        "denoise_ms_per_step": stages["denoise_ms"] / steps,
    }


def compare_denoiser_precisions(plan, batch: int, cond: np.ndarray, threads: int | None, repeats: int = 30,
                                seed: int = 0) -> dict:
    """Median ms of one denoiser call at ``batch`` for fp32 and the plan's int8 graph, on the same
    bound inputs (latents ~ N(0,1), t = 500, the image's condition), calls interleaved so that
    machine noise hits both alike.  On an x86 CPU whose own int8 path for this plan is not the exact
    u8u8 one, that path is timed too (``int8_u8u8_ms``) and its eps compared bit for bit with the
    own path's: it is what a CPU without VNNI runs for a plan without 7-bit weights."""
    from ..backends.onnxruntime_backend import OnnxRuntimeBackend
    from .cpu_features import plan_int8_kernel_path
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *plan.latent_shape), dtype=np.float32)
    variants = {"fp32": ("fp32", None), "int8": ("int8", None)}
    if plan_int8_kernel_path(plan).name in ("u8s8-vnni", "u8s8-7bit"):
        variants["int8_u8u8"] = ("int8", "exact")
    runs = {}
    for name, (prec, mode) in variants.items():
        b = OnnxRuntimeBackend(plan, threads=threads, precision=prec, int8_kernel_mode=mode)
        buf = b.buffers(batch)
        buf.x[...], buf.t[...], buf.cond[...] = x, 500.0, cond[:1]
        runs[name] = (b, buf)
    times = time_interleaved({p: functools.partial(b.denoise_bound, buf) for p, (b, buf) in runs.items()},
                             repeats, warmup=3)
    eps = {p: buf.eps.copy() for p, (b, buf) in runs.items()}
    med = {p: statistics.median(v) for p, v in times.items()}
    out = {"batch": batch, "fp32_ms": med["fp32"], "int8_ms": med["int8"], "speedup": med["fp32"] / med["int8"],
           "int8_kernel": runs["int8"][0].int8_kernel.name, "int8_kernel_reason": runs["int8"][0].int8_kernel.reason,
           "eps_max_abs_diff": float(np.abs(eps["fp32"] - eps["int8"]).max()), "repeats": repeats}
    if "int8_u8u8" in med:
        out.update(int8_u8u8_ms=med["int8_u8u8"], speedup_u8u8=med["fp32"] / med["int8_u8u8"],
                   u8u8_equals_own_path=bool(np.array_equal(eps["int8_u8u8"], eps["int8"])))
    return out


def denoiser_gflops(plan, batch: int) -> float:
    return graph_flops(plan.blob("denoiser"), batch) / 1e9


def machine_info(threads: int, plan=None) -> dict:
    """The machine a figure was measured on: CPU model, the ISA flags that decide fp32 and int8
    speed, and the int8 kernel path (for ``plan``'s int8 graph when given: 7-bit graphs take the
    fast path everywhere), so that figures from different CPUs are never compared blind."""
    import onnxruntime as ort

    from .cpu_features import cpu_info, describe, int8_kernel_path, plan_int8_kernel_path
    cpu = cpu_info()
    path = plan_int8_kernel_path(plan, cpu) if plan else int8_kernel_path(cpu)
    return {"cpu_count": os.cpu_count(), "threads": threads, "cpu": cpu["model"], "arch": cpu["arch"],
            "isa": cpu["isa"], "cpu_summary": describe(cpu), "int8_kernel": path.name,
            "int8_kernel_reason": path.reason, "onnxruntime": ort.__version__, "load_average": load_average()}


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none): how busy a shared machine
    was while a figure was measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def format_table(rows: list[dict]) -> str:
    head = f"{'k':>3} {'steps':>5} {'median ms':>10} {'p90 ms':>8} {'hyp/s':>7} {'denoise':>8} {'decode':>7} " \
           f"{'overhead':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sh = r["stage_share"]
        lines.append(f"{r['k']:>3} {r['steps']:>5} {r['median_ms']:>10.1f} {r['p90_ms']:>8.1f} "
                     f"{r['hypotheses_per_s']:>7.1f} {100 * sh['denoise_ms']:>7.1f}% {100 * sh['decode_ms']:>6.1f}% "
                     f"{100 * r['overhead_fraction']:>7.2f}%")
    return "\n".join(lines)


def plan_sized_image(plan, img: np.ndarray) -> np.ndarray:
    """H x W x C image in [0, 1] -> the plan's size and channel count (what the SDK feeds its
    encoder before normalisation), so that every way compared sees the same pixels."""
    from ..image_input import convert_channels, resize_planes
    a = convert_channels(np.asarray(img, np.float32), plan.channels)
    planes = resize_planes(np.ascontiguousarray(a.transpose(2, 0, 1)), tuple(plan.image_size))
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


def mask_agreement(cons_a, cons_b, masks_a, masks_b) -> dict:
    """How far two runs on the same noise agree: fraction of pixels where the consensus masks, and
    the k masks, are equal; each consensus' foreground fraction; the consensus IoU (pixel agreement
    is high wherever most pixels are background, the IoU is the agreement on the lesion itself)."""
    a, b = np.asarray(cons_a, bool), np.asarray(cons_b, bool)
    return {"consensus_pixel_agreement": float(np.mean(a == b)),
            "masks_pixel_agreement": float(np.mean(np.asarray(masks_a, bool) == np.asarray(masks_b, bool))),
            "consensus_foreground_fraction": [float(a.mean()), float(b.mean())],
            "consensus_iou": float(np.sum(a & b) / max(1, np.sum(a | b)))}


def consensus_agreement(seg_a, seg_b, img, k: int, steps: int, seed: int, solver: str | None = None) -> dict:
    """Two segmenters (fp32 and int8) on the same image, k, steps, solver and seed, hence the same
    noise: fraction of pixels where their consensus masks, and their k masks, agree; with the time
    of each run."""
    runs = {}
    for name, seg in (("a", seg_a), ("b", seg_b)):
        t0 = time.perf_counter()
        runs[name] = seg.run(img, k=k, steps=steps, seed=seed, solver=solver)
        runs[name + "_ms"] = (time.perf_counter() - t0) * 1e3
    a, b = runs["a"], runs["b"]
    return {"k": k, "steps": steps, "seed": seed, **mask_agreement(a.consensus, b.consensus, a.masks, b.masks),
            "mean_prob_max_abs_diff": float(np.abs(a.mean - b.mean).max()),
            "run_ms": [runs["a_ms"], runs["b_ms"]]}


def peak_rss_of_run(plan, image: str, k: int, steps: int, precision: str = "fp32", threads: int | None = None,
                    backend: str = "onnxruntime", seed: int = 0, solver: str | None = None) -> dict:
    """Peak resident memory of a fresh process that loads ``plan`` and segments ``image`` once at
    ``k``/``steps`` (peak RSS only grows within a process, so each k gets its own process)."""
    import json
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "msld_sdk.tools.bench", "rss", str(plan), str(image), str(k), str(steps), precision,
           str(threads or 0), backend, str(seed), solver or ""]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:   # the child's own error, not just its exit status
        raise RuntimeError(f"the peak-RSS run at k={k} failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _rss_child(argv: list[str]) -> None:
    import json

    from ..segmenter import Segmenter
    plan, image, k, steps, precision, threads, backend, seed, solver = argv
    before = peak_rss_mb()
    seg = Segmenter(plan, backend=backend, threads=int(threads) or None, precision=precision)
    loaded = peak_rss_mb()
    t0 = time.perf_counter()
    seg.run(image, k=int(k), steps=int(steps), seed=int(seed), solver=solver or None)
    print(json.dumps({"k": int(k), "steps": int(steps), "precision": precision, "peak_rss_mb": peak_rss_mb(),
                      "peak_rss_mb_after_load": loaded, "peak_rss_mb_at_start": before,
                      "run_ms": (time.perf_counter() - t0) * 1e3}))


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["rss"]:
        _rss_child(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m msld_sdk.tools.bench rss PLAN IMAGE K STEPS PRECISION THREADS BACKEND SEED")
