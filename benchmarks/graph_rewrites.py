"""Graph rewrites that were tried for CPU speed and *not* adopted, kept so the decision can be
re-checked on another machine or ONNX Runtime version.

    python -m benchmarks.graph_rewrites [lidc|polyp] [--json FILE]

Each rewrite is exact (the script checks outputs against the shipped graph before timing);
each is timed interleaved with the shipped graph in one process (one call at batch 8, rounds
in shuffled order, median of round medians), and reported as a ratio.

1. Nearest 2x upsample + 3x3 convolution as four 2x2 "phase" convolutions on the small input
   plus an interleave.  This does 16/36 of the convolution's multiply-adds, so those convs run
   in about half the time, but ONNX Runtime has no fast interleave: DepthToSpace moves about
   1 GB/s here, and a grouped ConvTranspose with one-hot 2x2 kernels plus the extra NCHWc
   reorders spend what the convolutions save (2026-11-27: 1.00x and 0.91x).
2. GroupNorm written with ReduceMean/Sub/Mul/Add instead of Reshape + LayerNormalization, so
   that ONNX Runtime's transpose optimizer can move the NHWC<->NCHW Transposes it puts around
   every int8 convolution through the normalisation (it cannot through a Reshape).  The large
   Transposes do go, but the extra elementwise nodes per GroupNorm cost more (0.97x).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from msld_sdk.backends.onnxruntime_backend import session_options
from msld_sdk.tools.bench import time_calls
from msld_sdk.plan import Plan
from msld_sdk.segmenter import resolve_plan_path

# Rows of the 2-tap kernels that a nearest-2x upsample followed by a 3x3 kernel amounts to:
# output row 2i uses input rows (i-1, i) with taps (w0, w1 + w2); row 2i+1 uses (i, i+1) with
# (w0 + w1, w2).  The same holds for columns.
_PHASE_ROWS = {0: np.array([[1, 0, 0], [0, 1, 1]], np.float64), 1: np.array([[1, 1, 0], [0, 0, 1]], np.float64)}


def _consumers(graph) -> dict:
    out: dict = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _replace(model, replacements: dict, dead: set) -> bytes:
    g = model.graph
    nodes = []
    for n in g.node:
        nodes += replacements.get(id(n), [])
        if id(n) not in dead:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def upsample_conv_as_phases(model_bytes: bytes, interleave: str = "conv_transpose") -> tuple[bytes, int]:
    """Resize(nearest, x2) -> Conv(3x3, pad 1) becomes Conv(2x2, 4 x C_out channels, pad 1) on
    the small input, then an interleave ("conv_transpose": grouped ConvTranspose, stride 2,
    one-hot kernels; "depth_to_space": DepthToSpace CRD).  Returns (graph, rewrites)."""
    m = onnx.load_from_string(model_bytes)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    cons = _consumers(g)
    repl, dead = {}, set()
    for r in g.node:
        scales = inits.get(r.input[2]) if r.op_type == "Resize" and len(r.input) > 2 else None
        if scales is None or _attrs(r).get("mode") != b"nearest" or \
                numpy_helper.to_array(scales).tolist() != [1.0, 1.0, 2.0, 2.0]:
            continue
        (c, *more) = cons[r.output[0]]
        a = _attrs(c)
        if more or c.op_type != "Conv" or a.get("kernel_shape") != [3, 3] or a.get("pads") != [1, 1, 1, 1] \
                or a.get("strides", [1, 1]) != [1, 1] or a.get("group", 1) != 1:
            continue
        w = numpy_helper.to_array(inits[c.input[1]]).astype(np.float64)
        c_out = w.shape[0]
        phases = np.stack([np.einsum("rt,oitu,su->oirs", _PHASE_ROWS[pa], w, _PHASE_ROWS[pb])
                           for pa in (0, 1) for pb in (0, 1)], axis=1)      # C_out x 4 x C_in x 2 x 2
        bias = numpy_helper.to_array(inits[c.input[2]]) if len(c.input) > 2 else np.zeros(c_out, np.float32)
        p = f"phases{len(repl)}_"
        nodes = (_phases_conv_transpose if interleave == "conv_transpose" else _phases_depth_to_space)(
            g, r.input[0], c.output[0], phases, bias, p)
        repl[id(c)] = nodes
        dead |= {id(r), id(c)}
    return _replace(m, repl, dead), len(repl)


def _phases_conv_transpose(g, x: str, y: str, phases: np.ndarray, bias: np.ndarray, p: str) -> list:
    """One 2x2 convolution with padding 1 evaluates every phase at (H+1) x (W+1) positions;
    phase (a, b) of output pixel (i, j) sits at (i + a, j + b), and a grouped ConvTranspose
    (stride 2, one-hot 2x2 kernels, padding 1) puts it there."""
    c_out = phases.shape[0]
    sel = np.zeros((4 * c_out, 1, 2, 2), np.float32)
    for ph in range(4):
        sel[ph::4, 0, 1 - ph // 2, 1 - ph % 2] = 1.0
    g.initializer.extend([
        numpy_helper.from_array(phases.reshape(4 * c_out, -1, 2, 2).astype(np.float32), p + "w"),
        numpy_helper.from_array(np.repeat(bias, 4).astype(np.float32), p + "b"),
        numpy_helper.from_array(sel, p + "sel")])
    return [helper.make_node("Conv", [x, p + "w", p + "b"], [p + "all"], kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("ConvTranspose", [p + "all", p + "sel"], [y], kernel_shape=[2, 2], strides=[2, 2],
                             pads=[1, 1, 1, 1], group=c_out)]


def _phases_depth_to_space(g, x: str, y: str, phases: np.ndarray, bias: np.ndarray, p: str) -> list:
    """Four phase convolutions, each with its own padding, concatenated, then DepthToSpace."""
    g.initializer.append(numpy_helper.from_array(bias.astype(np.float32), p + "b"))
    nodes = []
    for ph in range(4):
        a, b = divmod(ph, 2)
        g.initializer.append(numpy_helper.from_array(phases[:, ph].astype(np.float32), f"{p}w{ph}"))
        nodes.append(helper.make_node("Conv", [x, f"{p}w{ph}", p + "b"], [f"{p}y{ph}"], kernel_shape=[2, 2],
                                      pads=[1 - a, 1 - b, a, b]))
    nodes.append(helper.make_node("Concat", [f"{p}y{ph}" for ph in range(4)], [p + "cat"], axis=1))  # DCR order
    nodes.append(helper.make_node("DepthToSpace", [p + "cat"], [y], blocksize=2, mode="DCR"))
    return nodes


def group_norm_reduce_form(model_bytes: bytes) -> tuple[bytes, int, list[str]]:
    """GroupNorm as exported (Reshape(B, G, -1) -> LayerNormalization -> Reshape -> Mul(gamma)
    -> Add(beta)) written with per-channel reductions: mean and variance over H, W, averaged
    within each group by a small MatMul, then (x - mean) * gamma / sqrt(var + eps) + beta.
    Returns (graph, rewrites, names of the group-averaging MatMuls, to be left fp32)."""
    m = onnx.load_from_string(model_bytes)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    repl, dead, matmuls, new = {}, set(), [], {}
    for ln in g.node:
        r1 = prod.get(ln.input[0]) if ln.op_type == "LayerNormalization" else None
        if r1 is None or r1.op_type != "Reshape" or r1.input[1] not in inits:
            continue
        after = [cons.get(ln.output[0], [None])[0]]
        for op in ("Mul", "Add"):
            nxt = cons.get(after[-1].output[0], []) if after[-1] is not None else []
            after.append(nxt[0] if len(nxt) == 1 and nxt[0].op_type == op else None)
        r2, mul, add = after
        if r2 is None or r2.op_type != "Reshape" or mul is None or add is None:
            continue
        x = r1.input[0]
        groups = int(numpy_helper.to_array(inits[r1.input[1]])[1])
        gamma = numpy_helper.to_array(inits[mul.input[1]]).ravel().astype(np.float32)
        channels = gamma.size
        eps = next(a.f for a in ln.attribute if a.name == "epsilon")
        avg = f"group_mean_{channels}_{groups}"
        if avg not in new:
            per = channels // groups
            new[avg] = np.kron(np.eye(groups), np.full((per, per), 1.0 / per)).astype(np.float32)
            new["hw_axes"] = np.array([2, 3], np.int64)
            new["gn_eps"] = np.array(eps, np.float32)
        p = f"gnr{len(repl)}_"
        new[p + "gamma"] = gamma
        mk = helper.make_node
        nodes = [mk("ReduceMean", [x, "hw_axes"], [p + "mc"], keepdims=0),
                 mk("MatMul", [p + "mc", avg], [p + "mg"], name=p + "mean_matmul"),
                 mk("Unsqueeze", [p + "mg", "hw_axes"], [p + "mu"]),
                 mk("Sub", [x, p + "mu"], [p + "d"]),
                 mk("Mul", [p + "d", p + "d"], [p + "dd"]),
                 mk("ReduceMean", [p + "dd", "hw_axes"], [p + "vc"], keepdims=0),
                 mk("MatMul", [p + "vc", avg], [p + "vg"], name=p + "var_matmul"),
                 mk("Add", [p + "vg", "gn_eps"], [p + "ve"]),
                 mk("Sqrt", [p + "ve"], [p + "sd"]),
                 mk("Div", [p + "gamma", p + "sd"], [p + "s"]),
                 mk("Unsqueeze", [p + "s", "hw_axes"], [p + "s4"]),
                 mk("Mul", [p + "d", p + "s4"], [p + "y"]),
                 mk("Add", [p + "y", add.input[1]], [add.output[0]])]
        matmuls += [p + "mean_matmul", p + "var_matmul"]
        repl[id(add)] = nodes
        dead |= {id(r1), id(ln), id(r2), id(mul), id(add)}
        shape = prod.get(r2.input[1])
        if shape is not None and shape.op_type == "Shape" and len(cons[shape.output[0]]) == 1:
            dead.add(id(shape))
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in new.items())
    return _replace(m, repl, dead), len(repl), matmuls


def _feeds(session, batch: int, rng) -> dict:
    out = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        out[i.name] = (rng.uniform(0, 999, shape) if i.name == "t" else rng.standard_normal(shape)).astype(np.float32)
    return out


def time_interleaved(graphs: dict, batch: int = 8, calls: int = 30, rounds: int = 9) -> dict:
    """Median ms per call of each graph, interleaved (rounds in shuffled order)."""
    rng = np.random.default_rng(0)
    sessions = {k: ort.InferenceSession(b, session_options(), providers=["CPUExecutionProvider"])
                for k, b in graphs.items()}
    feeds = {k: _feeds(s, batch, rng) for k, s in sessions.items()}
    per_round = {k: [] for k in graphs}
    for r in range(rounds):
        order = list(sessions)
        np.random.default_rng(r).shuffle(order)
        for k in order:
            s, f = sessions[k], feeds[k]
            per_round[k].append(float(np.median(time_calls(lambda: s.run(None, f), calls, warmup=3))))
    return {k: float(np.median(v)) for k, v in per_round.items()}


def max_rel_diff(a: bytes, b: bytes, batch: int = 8) -> float:
    """max |a - b| / max |a| of two graphs' outputs on the same random inputs."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sa, sb = ort.InferenceSession(a, so), ort.InferenceSession(b, so)
    f = _feeds(sa, batch, np.random.default_rng(1))
    ya, yb = sa.run(None, f)[0], sb.run(None, f)[0]
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def checked(shipped: bytes, rewritten: bytes, what: str, tol: float = 1e-5) -> bytes:
    err = max_rel_diff(shipped, rewritten)
    print(f"{what}: max relative difference from the shipped graph {err:.1e}", flush=True)
    if not err <= tol:
        raise SystemExit(f"{what} is not exact (relative difference {err:.1e} > {tol:.0e}); not timed")
    return rewritten


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", nargs="?", default="lidc", choices=["lidc", "polyp"])
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    from msld_export.plan_writing import quantize_int8 as q
    from msld_export.training.data import default_data_root

    path = resolve_plan_path(a.kind)
    plan = Plan.open(path)
    decoder, denoiser = plan.blob("decoder"), plan.blob("denoiser")
    report = {"plan": a.kind, "batch": 8, "comparisons": []}

    def compare(title, shipped, candidates):
        ms = time_interleaved({"shipped": shipped, **candidates})
        row = {"what": title, "shipped_ms": round(ms["shipped"], 2),
               "candidates": {k: {"ms": round(v, 2), "speedup": round(ms["shipped"] / v, 3)}
                              for k, v in ms.items() if k != "shipped"}}
        report["comparisons"].append(row)
        print(f"{title}: shipped {ms['shipped']:.2f} ms; " + "; ".join(
            f"{k} {c['ms']:.2f} ms = {c['speedup']:.2f}x" for k, c in row["candidates"].items()), flush=True)

    phases = {}
    for how in ("conv_transpose", "depth_to_space"):
        g, n = upsample_conv_as_phases(decoder, how)
        phases[f"phases + {how}"] = checked(decoder, g, f"decoder, {n} upsample+conv as phases + {how}")
    compare("decoder fp32, nearest-2x upsample + 3x3 conv", decoder, phases)

    images, _ = q.calibration_images(a.kind, default_data_root(), 128, 4)
    feeds = q.record_denoiser_inputs(path, images, k=2)
    reduce_form, n, matmuls = group_norm_reduce_form(denoiser)
    checked(denoiser, reduce_form, f"denoiser, {n} GroupNorms in reduce form")
    shipped_int8 = q.quantize_denoiser(denoiser, feeds)
    candidate = q.quantize_denoiser(reduce_form, feeds, keep_fp32=matmuls + [q.output_conv(reduce_form)])
    compare("denoiser int8 (4 calibration images), GroupNorm", shipped_int8, {"reduce form": candidate})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
