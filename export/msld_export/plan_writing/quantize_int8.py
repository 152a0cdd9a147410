"""Add an int8 denoiser to a plan (ONNX Runtime static quantization), used by
``Segmenter(plan, precision="int8")`` / ``msld segment|bench|eval --precision int8``.

    python -m msld_export.plan_writing.quantize_int8 msld_sdk/models/lidc.plan [--kind lidc] [--images 16]

Calibration uses the denoiser's real inputs: the fp32 plan samples k=2 hypotheses for N
*training* images (never validation images) at its default number of steps, and every
(x, t, cond) it feeds the denoiser is recorded.  Only Conv and MatMul are quantized (QDQ,
per-channel 7-bit weights in int8 (``reduce_range``: |w| <= 64, so the 16-bit pair sums of
CPUs without VNNI cannot saturate), uint8 activations, MinMax ranges); the output convolution
stays fp32.  The recipe and its alternatives: ``python -m benchmarks.int8_recipes`` and
benchmarks/README.md.  The fp32 graphs are untouched; the plan gains
``graphs/denoiser_int8.onnx`` and a manifest entry ``int8`` saying how it was made, its largest
16-bit pair sum (``reduce_range: true`` when that cannot saturate) and how far it is from fp32
on the calibration inputs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from msld_sdk import Segmenter
from msld_sdk.plan import INT8_KEY, Plan, add_blobs

BLOB = "denoiser_int8"
OPS = ["Conv", "MatMul"]
INT16_MAX = 32767


def record_denoiser_inputs(plan_path, images: list[np.ndarray], k: int = 2, steps: int | None = None,
                           seed: int = 0, batch: int = 8) -> list[dict]:
    """Run the fp32 plan on ``images`` (H x W [x C] arrays) and return every denoiser feed."""
    seg = Segmenter(plan_path, backend="onnxruntime")
    feeds = []
    run_bound = seg.backend.denoise_bound

    def recording(buf):
        feeds.append({"x": buf.x.copy(), "t": buf.t.copy(), "cond": buf.cond.copy()})
        run_bound(buf)

    seg.backend.denoise_bound = recording
    for s in range(0, len(images), batch):
        seg.run(images[s:s + batch], k=k, steps=steps, seed=seed + s)
    return feeds


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def output_conv(onnx_bytes: bytes) -> str:
    """Name of the last Conv in graph order (the denoiser's output convolution)."""
    import onnx
    return [n.name for n in onnx.load_from_string(onnx_bytes).graph.node if n.op_type == "Conv"][-1]


def quantize_denoiser(fp32_onnx: bytes, feeds: list[dict], method=CalibrationMethod.MinMax,
                      keep_fp32: list[str] | None = None, reduce_range: bool = True,
                      quant_format=QuantFormat.QDQ, per_channel: bool = True) -> bytes:
    """The shipped recipe by default; ``method``, ``keep_fp32`` (node names left fp32, default:
    the output convolution), ``reduce_range`` (7-bit weights; False: the full int8 range, as
    plans made before 2026-12-03), ``quant_format`` and ``per_channel`` let
    benchmarks/int8_recipes.py and int8_selective.py compare alternatives (any graph: the
    decoder too)."""
    if keep_fp32 is None:
        keep_fp32 = [output_conv(fp32_onnx)]
    with tempfile.TemporaryDirectory() as d:
        src, pre, out = Path(d, "fp32.onnx"), Path(d, "pre.onnx"), Path(d, "int8.onnx")
        src.write_bytes(fp32_onnx)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), _Reader(feeds), quant_format=quant_format, op_types_to_quantize=OPS,
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=keep_fp32)
        return out.read_bytes()


def pair_sum_bounds(int8_onnx: bytes) -> list[dict]:
    """For every quantized Conv/MatMul/Gemm of a QDQ graph whose inputs are an 8-bit activation
    and an int8 weight initializer (the u8s8 kernels' case): the largest |activation| the
    activation's type allows (uint8: 255, int8: 128), the largest |weight| stored, and the
    largest sum of two adjacent products, 2 x a x w, which VPMADDUBSW keeps in a saturating
    int16 on CPUs without VNNI.  Products of two activations (u8u8 kernels) are not listed:
    those kernels widen to 16 bits before multiplying and never saturate."""
    import onnx
    from onnx import numpy_helper
    g = onnx.load_from_string(int8_onnx).graph
    init = {i.name: i for i in g.initializer}
    made_by = {o: n for n in g.node for o in n.output}

    def quantized(name):   # (kind, integer dtype, values or None) of a DequantizeLinear's input
        dq = made_by.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        src = dq.input[0]
        if src in init:
            return "weight", numpy_helper.to_array(init[src])
        ql = made_by.get(src)
        if ql is not None and ql.op_type == "QuantizeLinear" and len(ql.input) > 2 and ql.input[2] in init:
            return "activation", numpy_helper.to_array(init[ql.input[2]])   # its zero point gives the type
        raise ValueError(f"{dq.name}: cannot tell where the quantized input {src!r} comes from")

    out = []
    for n in g.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        ins = [quantized(i) for i in n.input[:2]]
        if None in ins:
            continue                                                   # left fp32
        kinds = sorted(k for k, _ in ins)
        if kinds != ["activation", "weight"]:
            continue                                                   # activation x activation: u8u8
        act = next(v for k, v in ins if k == "activation")
        w = next(v for k, v in ins if k == "weight")
        if w.dtype != np.int8:
            raise ValueError(f"{n.name}: weights of type {w.dtype}, expected int8")
        a_max = 255 if act.dtype == np.uint8 else 128
        w_max = int(np.abs(w.astype(np.int64)).max())
        out.append({"node": n.name, "op": n.op_type, "activation_max": a_max, "weight_max_abs": w_max,
                    "pair_sum_max": 2 * a_max * w_max})
    return out


def int8_session(onnx_bytes: bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with the SDK's settings and the int8 kernel path it would choose on this CPU
    (msld_sdk.tools.cpu_features), so that errors measured here are those users get."""
    from msld_sdk.backends.onnxruntime_backend import session_options
    from msld_sdk.tools.cpu_features import int8_kernel_path
    opts = session_options(threads, int8_kernel_path().session_config)
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def eps_error(fp32_onnx: bytes, int8_onnx: bytes, feeds: list[dict]) -> float:
    """max |eps_int8 - eps_fp32| / max |eps_fp32| over the feeds."""
    a, b = int8_session(fp32_onnx), int8_session(int8_onnx)
    num = den = 0.0
    for f in feeds:
        ra, rb = a.run(None, f)[0], b.run(None, f)[0]
        num, den = max(num, float(np.abs(ra - rb).max())), max(den, float(np.abs(ra).max()))
    return num / max(den, 1e-12)


def rms_relative_error(ref: list[np.ndarray], session: ort.InferenceSession, feeds: list[dict]) -> float:
    """sqrt(mean squared error / mean square of ``ref``) of ``session``'s outputs on ``feeds``
    against ``ref`` (the fp32 outputs on the same feeds, computed once by the caller)."""
    err = [np.mean((session.run(None, f)[0] - r) ** 2) for f, r in zip(feeds, ref)]
    return float(np.sqrt(np.mean(err) / np.mean([np.mean(r ** 2) for r in ref])))


def calibration_images(kind: str, data_root, size: int, n: int) -> tuple[list[np.ndarray], list[str]]:
    """n training images evenly spaced over the split (LIDC: slices some annotator marked)."""
    from ..training.data import load_split
    data = load_split(kind, data_root, "train", size)
    cand = np.nonzero(data.nonempty().any(1))[0] if kind == "lidc" else np.arange(len(data))
    idx = cand[np.linspace(0, len(cand) - 1, min(n, len(cand))).round().astype(int)]
    imgs = [data.images[i].transpose(1, 2, 0).astype(np.float32) / 255.0 for i in idx]
    return [im[:, :, 0] if im.shape[2] == 1 else im for im in imgs], [data.ids[i] for i in idx]


def random_images(plan: Plan, n: int, seed: int = 0) -> list[np.ndarray]:
    """n uniform-noise images of the plan's size and channels: calibration for plans with random
    weights (``msld_export.reference.bench_plan``), which have no data set to calibrate on."""
    rng = np.random.default_rng(seed)
    h, w = plan.image_size
    shape = (h, w) if plan.channels == 1 else (h, w, plan.channels)
    return [rng.random(shape, dtype=np.float32) for _ in range(n)]


def add_int8_denoiser(plan_path, images: list[np.ndarray], source: dict, k: int = 2, seed: int = 0,
                      steps: int | None = None, reduce_range: bool = True) -> dict:
    """Quantize the plan's denoiser with ``images`` as calibration and store it in the plan
    (calibration runs at ``steps``, default the plan's default step count; ``reduce_range=False``
    makes the full-range 8-bit weights of plans made before 2026-12-03, for tests)."""
    plan = Plan.open(plan_path)
    steps = int(steps or plan.defaults["steps"])
    feeds = record_denoiser_inputs(plan_path, images, k=k, steps=steps, seed=seed)
    fp32 = plan.blob("denoiser")
    int8 = quantize_denoiser(fp32, feeds, reduce_range=reduce_range)
    pair_max = max(b["pair_sum_max"] for b in pair_sum_bounds(int8))
    entry = {
        "denoiser": BLOB,
        "method": "onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights"
                  + (" with reduce_range (7 bits, |w| <= 64)" if reduce_range else "") + ", uint8 activations, "
                  f"MinMax calibration, ops {OPS}, output convolution kept fp32",
        # read by msld_sdk.tools.cpu_features: true lets CPUs without VNNI use the fast u8s8 kernels
        "reduce_range": pair_max <= INT16_MAX,
        "pair_sum_max": pair_max,
        "onnxruntime": ort.__version__,
        "calibration": {**source, "images": len(images), "k": k, "steps": steps, "feeds": len(feeds)},
        "eps_max_rel_err_on_calibration": eps_error(fp32, int8, feeds),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    add_blobs(plan_path, {BLOB: (f"graphs/{BLOB}.onnx", int8)}, {INT8_KEY: entry})
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msld_export.plan_writing.quantize_int8", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", help="plan file to add the int8 denoiser to (rewritten in place)")
    ap.add_argument("--kind", default=None, help="calibration data set (default: from the plan's model name); "
                    "'random': uniform-noise images, for plans with random weights (bench_plan)")
    ap.add_argument("--data", default=None, help="data root (default ../shared/data)")
    ap.add_argument("--images", type=int, default=16, help="training images to calibrate on (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps of the calibration runs (default: the plan's)")
    a = ap.parse_args(argv)
    from ..training.data import data_kind_for, default_data_root
    plan = Plan.open(a.plan)
    kind = a.kind or data_kind_for(plan.manifest["model"]["name"])
    if kind == "random":
        images, source = random_images(plan, a.images, a.seed), {"kind": "random", "note": "uniform noise images"}
    else:
        root = Path(a.data) if a.data else default_data_root()
        images, ids = calibration_images(kind, root, plan.image_size[0], a.images)
        source = {"kind": kind, "split": "train", "first_ids": ids[:3]}
    e = add_int8_denoiser(a.plan, images, source, seed=a.seed, steps=a.steps)
    print(f"added {BLOB} to {a.plan}: calibrated on {e['calibration']['feeds']} denoiser calls "
          f"({len(images)} {kind} training images, k={e['calibration']['k']}); "
          f"max relative eps error vs fp32 on them {e['eps_max_rel_err_on_calibration']:.3f}")
    return 0


if __name__ == "__main__":   # errors as one line (exit 1, or 2 for usage), as msld's own commands
    import sys

    from msld_sdk.cli.options import run_command
    raise SystemExit(run_command("python -m msld_export.plan_writing.quantize_int8", main, sys.argv[1:]))
