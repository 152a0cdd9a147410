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
        if "int8_u8u8_ms" in q:
            out[-1] += f" Exact u8u8 path (a CPU without VNNI): {q['int8_u8u8_ms']:.2f} ms = {q['speedup_u8u8']:.2f}x."
    if "int8_run" in d:
        r, ag = d["int8_run"], d["int8_run"]["int8_vs_fp32"]
        out += ["", "| precision | median ms | encode ms | denoise ms | decode ms | rest ms (mean stage times) |", "|---|---|---|---|---|---|"]
        for name in ("fp32", "int8"):
            st = r[name]["stages_ms"]
            other = sum(v for k, v in st.items() if k not in ("encode_ms", "denoise_ms", "decode_ms"))
            out.append(f"| {name} | {r[name]['median_ms']:.1f} | {st['encode_ms']:.1f} | {st['denoise_ms']:.1f} "
                       f"| {st['decode_ms']:.1f} | {other:.1f} |")
        out += ["", f"Whole run int8 vs fp32 (k={ag['k']}, {ag['steps']} steps, seed {ag['seed']}, same noise): "
                    f"{r['speedup']:.2f}x, denoising {r['denoise_speedup']:.2f}x; consensus masks agree on "
                    f"{100 * ag['consensus_pixel_agreement']:.2f}% of pixels, the k masks on "
                    f"{100 * ag['masks_pixel_agreement']:.2f}%; consensus foreground fp32/int8 "
                    f"{100 * ag['consensus_foreground_fraction'][0]:.1f}% / {100 * ag['consensus_foreground_fraction'][1]:.1f}%"
                    + (f"; consensus IoU {ag['consensus_iou']:.3f}." if "consensus_iou" in ag else ".")]
    if "peak_rss_by_k" in d:
        out += ["", "| k | steps | peak RSS MB (one run, fresh process) | after loading the plan MB |", "|---|---|---|---|"]
        out += [f"| {r['k']} | {r['steps']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb_after_load']:.0f} |"
                for r in d["peak_rss_by_k"]]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
