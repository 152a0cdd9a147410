"""Time the GPU sampling loop (export/msld_export/sampling/gpu_sampler.py): step by step vs CUDA-graph replay.

For each k in --ks and steps in --steps: the whole sample() of one image (encode, initial noise,
all DDIM steps, decode, aggregate), timed with CUDA events after warm-up, median of --repeats.
The graph's capture is timed apart (wall clock, once per configuration). Prints a table and
writes JSON to --out.

    python benchmarks/gpu_bench.py --out gpu_bench.json [--checkpoint ckpt.safetensors]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from msld_export.model.checkpoint import load_checkpoint, random_model
from msld_export.model.config import ModelConfig
from msld_export.sampling.gpu_sampler import GpuSampler, cuda_unavailable_reason


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _time_ms(fn, warmup: int, repeats: int) -> list[float]:
    for i in range(warmup):
        fn(1000 + i)
    torch.cuda.synchronize()
    times = []
    for r in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _summary(times: list[float], steps: int) -> dict:
    s = sorted(times)
    return {
        "median_ms": statistics.median(s),
        "min_ms": s[0],
        "p90_ms": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
        "per_step_ms": statistics.median(s) / steps,
        "repeats": len(s),
        "times_ms": [round(t, 4) for t in times],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--checkpoint", help="safetensors checkpoint (default: random weights, default ModelConfig)")
    ap.add_argument("--ks", default="1,8,16")
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--max-seconds", type=float, default=240.0,
                    help="stop starting new configurations after this long (the rest are listed as skipped)")
    args = ap.parse_args(argv)

    why = cuda_unavailable_reason()
    if why is not None:
        print(f"gpu_bench: cannot run: {why}", file=sys.stderr)
        return 2

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        source = args.checkpoint
    else:
        model = random_model(ModelConfig(), seed=0)
        source = "random weights (ModelConfig default)"
    cfg = model.cfg
    sampler = GpuSampler.from_model(model, eta=args.eta, clip=args.clip)
    image = (torch.rand(1, cfg.image_channels, cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()

    t0 = time.perf_counter()
    rows, skipped = [], []
    for k in _ints(args.ks):
        for steps in _ints(args.steps):
            if time.perf_counter() - t0 > args.max_seconds:
                skipped.append({"k": k, "steps": steps})
                continue
            eager = _time_ms(lambda s: sampler.sample(image, k=k, steps=steps, seed=s), args.warmup, args.repeats)
            torch.cuda.synchronize()
            c0 = time.perf_counter()
            first = sampler.sample(image, k=k, steps=steps, seed=0, use_graph=True)  # captures
            torch.cuda.synchronize()
            capture_s = time.perf_counter() - c0
            ref = sampler.sample(image, k=k, steps=steps, seed=0)
            same = bool(torch.equal(first.masks, ref.masks)) and bool(torch.allclose(first.mean, ref.mean, atol=1e-6))
            graph = _time_ms(lambda s: sampler.sample(image, k=k, steps=steps, seed=s, use_graph=True, copy=False),
                             args.warmup, args.repeats)
            sampler.clear_graphs()
            torch.cuda.empty_cache()
            row = {"k": k, "steps": steps, "eager": _summary(eager, steps), "graph": _summary(graph, steps),
                   "graph_capture_s": capture_s, "graph_matches_eager": same}
            row["speedup"] = row["eager"]["median_ms"] / row["graph"]["median_ms"]
            rows.append(row)
            print(f"k={k:3d} steps={steps:3d}  eager {row['eager']['median_ms']:9.3f} ms  "
                  f"graph {row['graph']['median_ms']:9.3f} ms  x{row['speedup']:.2f}  "
                  f"(capture {capture_s:.2f} s, same={same})", flush=True)

    b = torch.backends
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": b.cudnn.version(),
        "python": platform.python_version(),
        "tf32": {"cudnn": b.cudnn.allow_tf32, "matmul": b.cuda.matmul.allow_tf32},
        "model": source,
        "model_config": cfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_images": 1,
        "eta": args.eta,
        "clip": args.clip,
        "warmup": args.warmup,
        "timing": "CUDA events around sample(); median of repeats; graph mode excludes the one-time capture",
        "results": rows,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print()
    print(f"{result['gpu']}  torch {result['torch']}  model: {source}")
    print(f"{'k':>4} {'steps':>5} {'eager ms':>10} {'graph ms':>10} {'speedup':>8} {'eager/step':>11} {'graph/step':>11}")
    for r in rows:
        print(f"{r['k']:>4} {r['steps']:>5} {r['eager']['median_ms']:>10.3f} {r['graph']['median_ms']:>10.3f} "
              f"{r['speedup']:>8.2f} {r['eager']['per_step_ms']:>11.3f} {r['graph']['per_step_ms']:>11.3f}")
    if skipped:
        print(f"skipped (time budget): {skipped}")
    print(f"wrote {args.out}")
    return 0 if all(r["graph_matches_eager"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
