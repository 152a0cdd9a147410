"""int8 denoiser recipes timed against fp32 on this CPU (issue #23: >= 1.5x without VNNI).

    python -m benchmarks.int8_selective lidc|polyp [--rounds 3] [--profile] --json FILE   # $MSLD_DATA, train split

Each recipe is the shipped one (quantize_int8.py) with one change: ``static`` replaces the fp32
graph's GroupNorm ``Reshape(y, Shape(x))`` targets by constants first (H, W are fixed), which
drops the 16 dequantized copies ONNX Runtime made only for those ``Shape`` nodes; ``static_qop``
QOperator format, ``static_pertensor`` per-tensor weights, ``static_allconv`` the output
convolution int8 too, ``static_u8u8`` the exact u8u8 kernels, ``static_excl_*`` convolutions left
fp32 (``nodes_to_exclude``, listed in EXCLUDE).  Measured in one process, calls interleaved: one
denoiser call at batch 8 (median per round), the RMS eps error on held-out training inputs (as
int8_recipes.py), an int8 decoder made the same way, whole runs (k=8, one validation image, the
plan's default solver and steps) and, with ``--profile``, ONNX Runtime's time per op type;
``--session-settings`` instead compares fp32 and int8 under other thread-pool settings (SETTINGS).
Results: benchmarks/README.md, "int8 recipes on an AVX2 CPU without VNNI (2026-12-03)".
"""
import argparse
import collections
import functools
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat

from msld_export.plan_writing import quantize_int8 as q
from msld_export.training.data import default_data_root
from msld_sdk import Segmenter
from msld_sdk.backends.onnxruntime_backend import session_options
from msld_sdk.plan import INT8_KEY, Plan, add_blobs
from msld_sdk.segmenter import resolve_plan_path
from msld_sdk.tools.bench import machine_info, time_interleaved
from msld_sdk.tools.cpu_features import EXACT_CONFIG, int8_kernel_path

SAFE = int8_kernel_path(saturation_safe=True).session_config
EXCLUDE = {
    "static_excl_1x1": ["node_conv2d_6", "node_conv2d_10", "node_conv2d_12", "node_conv2d_17", "node_conv2d_21",
                        "node_conv2d_25"],
    "static_excl_fullres32": ["node_conv2d", "node_conv2d_1", "node_conv2d_2", "node_conv2d_24"],
    "static_excl_attn": ["node_conv2d_11", "node_conv2d_12"],
    "static_excl_fullres_all": ["node_conv2d", "node_conv2d_1", "node_conv2d_2", "node_conv2d_22", "node_conv2d_23",
                                "node_conv2d_24", "node_conv2d_25"],
}


def static_reshapes(fp32: bytes) -> bytes:
    """Each ``Shape`` node's output replaced by a constant (its value at batch 1, batch dim 0 =
    copy): exact for graphs whose other dims are fixed, as the plans' are."""
    m = onnx.load_from_string(fp32)
    shapes = [n for n in m.graph.node if n.op_type == "Shape"]
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for n in shapes:
        probe.graph.output.append(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.INT64, None))
    s = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([1 if isinstance(d, str) or d is None else d for d in i.shape], np.float32)
             for i in s.get_inputs()}
    values = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
    for n in shapes:
        v = values[n.output[0]].astype(np.int64)
        v[0] = 0
        const = helper.make_node("Constant", [], [n.output[0]], name=n.name + "_static",
                                 value=numpy_helper.from_array(v, n.output[0] + "_value"))
        i = list(m.graph.node).index(n)
        m.graph.node.remove(n)
        m.graph.node.insert(i, const)
    return m.SerializeToString()


def session(onnx_bytes: bytes, config=None) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_bytes, session_options(None, config), providers=["CPUExecutionProvider"])


def interleaved_ratios(sessions: dict, feeds: dict, rounds: int, repeats: int) -> dict:
    """{name: {"ms": [median per round], "ratio": [fp32 / it per round]}}; "fp32" must be a key."""
    calls = {n: functools.partial(s.run, None, feeds) for n, s in sessions.items()}
    out = {n: {"ms": [], "ratio": []} for n in sessions}
    for _ in range(rounds):
        med = {n: statistics.median(v) for n, v in time_interleaved(calls, repeats, warmup=3).items()}
        for n in sessions:
            out[n]["ms"].append(round(med[n], 2))
            out[n]["ratio"].append(round(med["fp32"] / med[n], 3))
    return out


def op_profile(graphs: dict, feeds: dict, repeats: int) -> dict:
    """ONNX Runtime's profile of the ``graphs`` ({name: (bytes, config)}), run interleaved: per run
    the summed kernel time of each op type, its median over runs, and the wall-time percentiles of
    the (profiled) runs: int8 calls on this shared machine are bimodal, fp32 ones much less."""
    sessions = {}
    with tempfile.TemporaryDirectory() as d:
        for n, (b, cfg) in graphs.items():
            o = session_options(None, cfg)
            o.enable_profiling, o.profile_file_prefix = True, str(Path(d, n))
            sessions[n] = ort.InferenceSession(b, o, providers=["CPUExecutionProvider"])
        for _ in range(repeats + 3):
            for s in sessions.values():
                s.run(None, feeds)
        out = {}
        for n, s in sessions.items():
            events = json.loads(Path(s.end_profiling()).read_text())
            runs = [e for e in events if e.get("name") == "model_run"][3:]
            kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            per_op = collections.defaultdict(list)
            for r in runs:
                c = collections.Counter()
                for e in kernels:
                    if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                        c[e["args"]["op_name"]] += e["dur"] / 1e3
                for op in set(c) | set(per_op):
                    per_op[op].append(c.get(op, 0.0))
            wall = [r["dur"] / 1e3 for r in runs]
            out[n] = {"run_ms_percentiles_10_25_50_75_90": [round(float(np.percentile(wall, p)), 1)
                                                            for p in (10, 25, 50, 75, 90)],
                      "run_ms_min": round(min(wall), 1),
                      "op_ms_median": {op: round(statistics.median(v), 2)
                                       for op, v in sorted(per_op.items(), key=lambda kv: -statistics.median(kv[1]))
                                       if statistics.median(v) >= 0.1}}
    return out


SETTINGS = {"2 threads, spinning (the SDK's)": {}, "2 threads, no spinning": {"allow_spinning": "0"},
            "1 thread": {"threads": 1}}


def settings_options(threads=None, config=None, allow_spinning=None):
    """The SDK's session options with one thread-pool setting changed."""
    o = session_options(threads, config)
    if allow_spinning is not None:
        o.add_session_config_entry("session.intra_op.allow_spinning", allow_spinning)
    return o


def session_settings(plan, path, int8_graphs: dict, feeds: dict, img, rounds: int, repeats: int, runs: int) -> dict:
    """fp32 against int8 under each of SETTINGS (applied to both precisions alike): one denoiser
    call at batch 8 (fp32 and ``int8_graphs`` interleaved, setting by setting), and whole runs
    (k=8, defaults) of both precisions under every setting, all interleaved."""
    import msld_sdk.backends.onnxruntime_backend as backend
    calls, whole, segs = {}, {}, {}
    for label, kw in SETTINGS.items():
        th, spin = kw.get("threads"), kw.get("allow_spinning")
        sessions = {"fp32": ort.InferenceSession(plan.blob("denoiser"), settings_options(th, None, spin),
                                                 providers=["CPUExecutionProvider"])}
        for n, b in int8_graphs.items():
            sessions[n] = ort.InferenceSession(b, settings_options(th, SAFE, spin), providers=["CPUExecutionProvider"])
        calls[label] = interleaved_ratios(sessions, feeds, rounds, repeats)
        print(label, json.dumps(calls[label]), flush=True)
        original = backend.session_options
        backend.session_options = lambda threads=None, config=None, _t=th, _s=spin: settings_options(
            _t or threads, config, _s)
        try:
            for prec in ("fp32", "int8"):
                segs[f"{prec}, {label}"] = Segmenter(path, backend="onnxruntime", precision=prec)
        finally:
            backend.session_options = original
    t = time_interleaved({n: functools.partial(s.run, img, k=8, seed=0) for n, s in segs.items()}, runs, warmup=2)
    for n in segs:
        whole[n] = round(statistics.median(t[n]), 1)
    for label in SETTINGS:
        whole[f"int8 over fp32, {label}"] = round(whole[f"fp32, {label}"] / whole[f"int8, {label}"], 3)
    print(json.dumps(whole), flush=True)
    return {"denoiser_call_batch8": calls, "whole_run_k8_defaults_ms": whole}


def record_decoder_inputs(plan_path, images, k=2, seed=0):
    seg = Segmenter(plan_path, backend="onnxruntime")
    zs, decode = [], seg.backend.decode

    def recording(z):
        zs.append(z.copy())
        return decode(z)

    seg.backend.decode = recording
    for s in range(0, len(images), 8):
        seg.run(images[s:s + 8], k=k, seed=seed + s)
    return np.concatenate(zs)


def _call_feeds(plan, batch=8):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((batch, *plan.latent_shape), dtype=np.float32),
            "t": np.full((batch,), 500.0, np.float32),
            "cond": rng.standard_normal((batch, *plan.condition_shape), dtype=np.float32)}


def _validation_image(kind, root, plan):
    from msld_export.training.data import load_split
    im = load_split(kind, root, "val", plan.image_size[0]).images[0].transpose(1, 2, 0).astype(np.float32) / 255
    return im[:, :, 0] if im.shape[2] == 1 else im


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["lidc", "polyp"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30, help="interleaved denoiser calls per round")
    ap.add_argument("--runs", type=int, default=10, help="interleaved whole runs")
    ap.add_argument("--profile", action="store_true", help="also profile fp32, shipped and static by op type")
    ap.add_argument("--session-settings", action="store_true",
                    help="only compare fp32 and int8 under thread-pool settings (spinning, 1 thread)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    path = resolve_plan_path(a.kind)
    plan = Plan.open(path)
    root = default_data_root()
    fp32 = plan.blob("denoiser")
    last = q.output_conv(fp32)
    images, _ = q.calibration_images(a.kind, root, plan.image_size[0], 16)          # as the shipped CLI
    feeds = q.record_denoiser_inputs(path, images, k=2, steps=int(plan.defaults["steps"]))
    held_imgs, _ = q.calibration_images(a.kind, root, plan.image_size[0], 48)
    held = q.record_denoiser_inputs(path, held_imgs[1::6], k=2, seed=100)           # as int8_recipes.py
    static = static_reshapes(fp32)
    if a.session_settings:
        x = _call_feeds(plan)
        out = {"plan": a.kind, "machine": machine_info(None, plan), "settings": SETTINGS,
               **session_settings(plan, path, {"shipped": plan.blob("denoiser_int8"),
                                               "static": q.quantize_denoiser(static, feeds, keep_fp32=[last])},
                                  x, _validation_image(a.kind, root, plan), a.rounds, a.repeats, a.runs)}
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        return 0
    ref = session(fp32)
    static_exact = all(np.array_equal(ref.run(None, f)[0], session(static).run(None, f)[0]) for f in held[:2])
    graphs = {"shipped": (plan.blob("denoiser_int8"), SAFE),
              "requantized": (q.quantize_denoiser(fp32, feeds, keep_fp32=[last]), SAFE)}
    s_int8 = q.quantize_denoiser(static, feeds, keep_fp32=[last])
    graphs.update(static=(s_int8, SAFE),
                  static_qop=(q.quantize_denoiser(static, feeds, keep_fp32=[last], quant_format=QuantFormat.QOperator),
                              SAFE),
                  static_pertensor=(q.quantize_denoiser(static, feeds, keep_fp32=[last], per_channel=False), SAFE),
                  static_allconv=(q.quantize_denoiser(static, feeds, keep_fp32=[]), SAFE),
                  static_u8u8=(s_int8, EXACT_CONFIG))
    for name, ex in EXCLUDE.items():
        graphs[name] = (q.quantize_denoiser(static, feeds, keep_fp32=[last] + ex), SAFE)
    sessions = {"fp32": ref, **{n: session(b, c) for n, (b, c) in graphs.items()}}
    ref_eps = [ref.run(None, f)[0] for f in held]
    out = {"plan": a.kind, "machine": machine_info(sessions["fp32"].get_session_options().intra_op_num_threads, plan),
           "defaults": {k: plan.defaults[k] for k in ("solver", "steps", "k")},
           "static_reshapes_exact_in_fp32": static_exact, "excluded": EXCLUDE,
           "rms_eps_error_held_out": {n: round(q.rms_relative_error(ref_eps, s, held), 4)
                                      for n, s in sessions.items() if n != "fp32"},
           "nodes": {n: len(onnx.load_from_string(b).graph.node) for n, (b, _) in graphs.items()}}
    x = _call_feeds(plan)
    out["denoiser_call_batch8"] = interleaved_ratios(sessions, x, a.rounds, a.repeats)
    print(json.dumps(out["denoiser_call_batch8"]), flush=True)
    if a.profile:
        out["op_profile_batch8"] = op_profile({"fp32": (fp32, None), "shipped": graphs["shipped"],
                                               "static": graphs["static"]}, x, a.repeats)
        print(json.dumps(out["op_profile_batch8"]), flush=True)

    # an int8 decoder, same recipe (static reshapes, 7-bit weights, last convolution fp32)
    zs = record_decoder_inputs(path, images)
    dec32 = plan.blob("decoder")
    dconvs = [n.name for n in onnx.load_from_string(dec32).graph.node if n.op_type == "Conv"]
    dec8 = q.quantize_denoiser(static_reshapes(dec32), [{"z": zs[i:i + 8]} for i in range(0, len(zs), 8)],
                               keep_fp32=[dconvs[-1]])
    d32, d8 = session(dec32), session(dec8, SAFE)
    zh = np.concatenate([f["x"] for f in held[-2:]])   # held-out latents, late steps
    p32, p8 = d32.run(None, {"z": zh})[0], d8.run(None, {"z": zh})[0]
    out["decoder_int8"] = {"max_abs_prob_diff": float(np.abs(p32 - p8).max()),
                           "mask_pixels_equal": float(((p32 > 0.5) == (p8 > 0.5)).mean()),
                           "call_batch8": interleaved_ratios({"fp32": d32, "int8": d8}, {"z": zh[:8]}, a.rounds,
                                                             a.repeats)}
    print(json.dumps(out["decoder_int8"]), flush=True)

    # whole runs at the plan's defaults
    with tempfile.TemporaryDirectory() as d:
        static_plan = Path(d, "static.plan")
        shutil.copy(path, static_plan)
        add_blobs(static_plan, {"denoiser_int8": ("graphs/denoiser_int8.onnx", s_int8)},
                  {INT8_KEY: plan.manifest[INT8_KEY]})
        img = _validation_image(a.kind, root, plan)
        segs = {"fp32": Segmenter(path, backend="onnxruntime"),
                "int8_shipped": Segmenter(path, backend="onnxruntime", precision="int8"),
                "int8_static": Segmenter(static_plan, backend="onnxruntime", precision="int8"),
                "int8_static_int8_decoder": Segmenter(static_plan, backend="onnxruntime", precision="int8")}
        segs["int8_static_int8_decoder"].backend.decoder = d8
        results = collections.defaultdict(list)

        def run(n):
            results[n].append(segs[n].run(img, k=8, seed=0))

        t = time_interleaved({n: functools.partial(run, n) for n in segs}, a.runs, warmup=2)
        whole = {}
        for n in segs:
            rs = results[n][-a.runs:]
            whole[n] = {"median_ms": round(statistics.median(t[n]), 1),
                        **{s: round(statistics.median(r.timings[s] for r in rs), 1)
                           for s in ("encode_ms", "denoise_ms", "decode_ms")},
                        "consensus_pixels_equal_fp32": float((rs[-1].consensus == results["fp32"][-1].consensus).mean())}
        for n in segs:
            whole[n]["ratio"] = round(whole["fp32"]["median_ms"] / whole[n]["median_ms"], 3)
            whole[n]["denoise_ratio"] = round(whole["fp32"]["denoise_ms"] / whole[n]["denoise_ms"], 3)
        out["whole_run_k8_defaults"] = whole
        print(json.dumps(whole), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
