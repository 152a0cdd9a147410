"""Compare int8 quantization recipes of a plan's denoiser on held-out *training* inputs.

How the recipe in export/msld_export/plan_writing/quantize_int8.py was chosen without looking at validation data:
each recipe is calibrated on the denoiser inputs of 16 (or 48) training images and scored
by its eps error against fp32 on the inputs of 8 other training images.

    python -m benchmarks.int8_recipes lidc      # or polyp; reads ../shared/data
    python -m benchmarks.int8_recipes lidc --per-layer

``--per-layer`` also scores the shipped recipe with each further convolution left fp32 in
turn: whether a few layers carry most of the error (they do not; see the results file).
"""
import argparse

import onnx
from onnxruntime.quantization import CalibrationMethod

from msld_export.plan_writing import quantize_int8 as q
from msld_export.training.data import default_data_root
from msld_sdk.plan import Plan
from msld_sdk.segmenter import resolve_plan_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["lidc", "polyp"])
    ap.add_argument("--per-layer", action="store_true", help="also leave each convolution fp32 in turn")
    a = ap.parse_args(argv)
    path = resolve_plan_path(a.kind)
    fp32 = Plan.open(path).blob("denoiser")
    images, _ = q.calibration_images(a.kind, default_data_root(), 128, 48)
    feeds16 = q.record_denoiser_inputs(path, images[::3], k=2)
    feeds48 = q.record_denoiser_inputs(path, images, k=2)
    held = q.record_denoiser_inputs(path, images[1::6], k=2, seed=100)
    ref = [q.int8_session(fp32).run(None, f)[0] for f in held]
    last = q.output_conv(fp32)
    recipes = {
        "MinMax, 16 images, every conv int8": (feeds16, CalibrationMethod.MinMax, []),
        "MinMax, 16 images, output conv fp32": (feeds16, CalibrationMethod.MinMax, [last]),
        "MinMax, 48 images, output conv fp32": (feeds48, CalibrationMethod.MinMax, [last]),
        "Percentile 99.999, 16 images, output conv fp32": (feeds16, CalibrationMethod.Percentile, [last]),
    }

    def rms_error(int8: bytes) -> float:
        return q.rms_relative_error(ref, q.int8_session(int8), held)

    for name, (feeds, method, exclude) in recipes.items():
        rms = rms_error(q.quantize_denoiser(fp32, feeds, method, keep_fp32=exclude))
        print(f"{a.kind}: {name:48s} RMS relative eps error on held-out training inputs {rms:.4f}", flush=True)
    if a.per_layer:
        shipped = rms_error(q.quantize_denoiser(fp32, feeds16))
        graph = onnx.load_from_string(fp32).graph
        weights = {i.name: list(i.dims) for i in graph.initializer}
        for node in graph.node:
            if node.op_type != "Conv" or node.name == last:
                continue
            rms = rms_error(q.quantize_denoiser(fp32, feeds16, keep_fp32=[last, node.name]))
            print(f"{a.kind}: shipped recipe + {node.name:16s} {str(weights[node.input[1]]):18s} fp32: "
                  f"{rms:.4f} ({100 * (rms / shipped - 1):+.0f} %)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
