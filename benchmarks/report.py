"""Print the markdown tables of benchmarks/README.md from a `msld bench --json` report.

    python benchmarks/report.py benchmarks/results/cpu_bench_2026-11-26.json
"""
import json
import sys


def tables(d: dict) -> str:
    rows = sorted(d["rows"], key=lambda r: (r["k"], r["steps"]))
    out = ["| k | steps | median ms | p90 ms | hypotheses/s | denoise | decode | overhead | denoiser GFLOP/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sh = r["stage_share"]
        out.append(f"| {r['k']} | {r['steps']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['hypotheses_per_s']:.1f} "
                   f"| {100 * sh['denoise_ms']:.1f}% | {100 * sh['decode_ms']:.1f}% | {100 * r['overhead_fraction']:.2f}% "
                   f"| {r['denoiser_gflops_per_s']:.0f} |")
    if "torch_eager_per_hypothesis_ms" in d:
        out += ["", "| way | median ms | SDK speed-up |", "|---|---|---|",
                f"| SDK (native loop, all k in one batch, I/O binding) | {d['sdk_ms']:.1f} | 1.00x |",
                f"| (a) PyTorch eager, one hypothesis at a time, encoder re-run, diffusers DDIMScheduler "
                f"| {d['torch_eager_per_hypothesis_ms']:.1f} | {d['speedup_vs_torch_eager_per_hypothesis']:.2f}x |",
                f"| (b) ONNX Runtime, once per hypothesis, ONNX Runtime's default session settings "
                f"| {d['ort_per_hypothesis_ms']:.1f} | {d['speedup_vs_ort_per_hypothesis']:.2f}x |"]
        if "ort_per_hypothesis_sdk_settings_ms" in d:
            out.append(f"| (b') ONNX Runtime, once per hypothesis, the SDK's session settings "
                       f"| {d['ort_per_hypothesis_sdk_settings_ms']:.1f} "
                       f"| {d['speedup_vs_ort_per_hypothesis_sdk_settings']:.2f}x |")
    main = next(r for r in d["rows"] if r["k"] == d["k"] and r["steps"] == d["steps"])
    out += ["", f"fp32 GEMM ceiling (ONNX Runtime MatMul 1024^3, best of 30, {d['machine']['threads']} threads): "
                f"{d['gemm_fp32_gflops_per_s']:.0f} GFLOP/s; denoiser at k={d['k']}: "
                f"{main['denoiser_gflops_per_s']:.0f} GFLOP/s = {100 * main['denoiser_fraction_of_gemm']:.0f}% of it; "
                f"peak RSS {d['peak_rss_mb']:.0f} MB."]
    if "int8_denoiser" in d:
        q = d["int8_denoiser"]
        out += ["", f"int8 denoiser (one call at batch {q['batch']}, {q['repeats']} interleaved calls each): "
                    f"fp32 {q['fp32_ms']:.2f} ms, int8 {q['int8_ms']:.2f} ms = {q['speedup']:.2f}x."]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
