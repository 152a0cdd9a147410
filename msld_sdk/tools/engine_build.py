"""``msld build``: TensorRT engines from a plan's ONNX graphs, stored back into the plan.

For each part (encoder, denoiser, decoder) the graph is parsed, built with one optimisation
profile over the batch axis (encoder 1..16, opt 1; denoiser and decoder 1..k_max, opt k,
batch = images x k) and stored under ``engines/<key>/<part>.engine`` with a manifest
``engines`` entry (flavour, version, precision, targeted compute capabilities, profiles, blob
names, sha256 of each engine and of the graph it came from). Several engine sets coexist in
a plan; building the same key again replaces that set; the ONNX graphs are never changed.

Precision: both flavours build strongly typed networks, so "fp16" means the graph is
converted before parsing (``convert_to_fp16``): the convolutions, matrix products and
einsums (weights and arithmetic) become fp16; normalisation, softmax, the timestep embedding
(sin/cos of t up to 1000, which fp16 cannot resolve) and everything else stay fp32, and the
graph's inputs and outputs stay fp32 so the runtime's buffers do not change.
Needs a TensorRT module (``tensorrt_rtx`` builds without a GPU) and ``onnx`` for fp16.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..backends import trt_compat
from ..checksums import sha256_bytes
from ..errors import MsldError
from ..plan import GRAPH_PARTS, Plan, add_blobs

ENCODER_MAX_BATCH = 16
LOW_PRECISION_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")
FP16_MAX = float(np.finfo(np.float16).max)


class EngineBuildError(MsldError):
    """Engines could not be built (missing package, unsupported target, parser or builder failure)."""


def engine_key(flavour: str, version: str, precision: str, ccs: list[str]) -> str:
    return f"{flavour}-{version}-{precision}-{trt_compat.cc_tag(ccs)}"


def engine_blob_name(key: str, part: str) -> str:
    return f"engines/{key}/{part}.engine"


def default_timing_cache_path(plan_path: str | Path) -> Path:
    return Path(str(plan_path) + ".timing.cache")


# ---- fp16 graph conversion -------------------------------------------------------------------
def convert_to_fp16(model_bytes: bytes, ops: tuple[str, ...] = LOW_PRECISION_OPS) -> bytes:
    """Mixed-precision copy of an ONNX graph: ``ops`` run in fp16, the rest stays fp32.

    Each listed node gets fp16 weights (initializers converted once) and fp16 activations
    (a Cast in front, shared between consumers, skipped when the producer is itself an fp16
    node), and its output is cast back to fp32 for the fp32 consumers. A node whose weights
    do not fit fp16 stays fp32. Graph inputs/outputs keep their types.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise EngineBuildError(f"fp16 engines need the onnx package to convert the graph ({e}): "
                               "pip install onnx, or build with --fp32") from e
    m = onnx.load_from_string(model_bytes)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
    fp16_of: dict[str, str] = {}
    new_inits = []
    nodes = []

    def fits_fp16(name: str) -> bool:
        t = inits.get(name)
        if t is None or t.data_type != FLOAT:
            return True
        a = numpy_helper.to_array(t)
        return a.size == 0 or float(np.abs(a).max()) <= FP16_MAX

    for node in g.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx") \
                or not all(fits_fp16(i) for i in node.input if i):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name not in fp16_of:
                lp = f"{name}__fp16"
                if name in inits:
                    if inits[name].data_type != FLOAT:
                        continue
                    new_inits.append(numpy_helper.from_array(
                        numpy_helper.to_array(inits[name]).astype(np.float16), lp))
                else:
                    nodes.append(helper.make_node("Cast", [name], [lp], to=FLOAT16, name=f"{lp}__cast"))
                fp16_of[name] = lp
            node.input[i] = fp16_of[name]
        outs = list(node.output)
        for j, out in enumerate(outs):
            node.output[j] = f"{out}__fp16"
            fp16_of[out] = node.output[j]
        nodes.append(node)
        for out in outs:
            nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], to=FLOAT, name=f"{out}__cast32"))

    # drop casts back to fp32 that nothing reads, then initializers nothing reads
    graph_outputs = {o.name for o in g.output}
    while True:
        used = {i for n in nodes for i in n.input} | graph_outputs
        keep = [n for n in nodes if not (n.op_type == "Cast" and n.name.endswith("__cast32")
                                         and n.output[0] not in used)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    used = {i for n in nodes for i in n.input} | graph_outputs
    all_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(all_inits)
    onnx.checker.check_model(m)
    return m.SerializeToString()


# ---- building --------------------------------------------------------------------------------
def _profiles(network, lo: int, opt: int, hi: int) -> dict:
    out = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise EngineBuildError(f"input '{t.name}' has shape {shape}: expected a dynamic batch axis "
                                   "and fixed other axes")
        out[t.name] = {k: [b] + shape[1:] for k, b in (("min", lo), ("opt", opt), ("max", hi))}
    return out


def build_engines(plan_path: str | Path, out: str | Path | None = None, *, fp32: bool = False,
                  k_max: int = 32, opt_k: int = 8, encoder_max: int = ENCODER_MAX_BATCH,
                  compute_capabilities: list[str] | None = None, timing_cache: str | Path | None = None,
                  flavour: str | None = None, progress: bool = True,
                  echo: Callable[[str], None] | None = None) -> dict:
    """Build the three engines of a plan and store them in it (or in ``out``).

    Returns the manifest ``engines`` entry. ``timing_cache`` defaults to ``OUT.timing.cache``
    beside the written plan (used and updated where the flavour has a timing cache).
    """
    if not (isinstance(k_max, int) and isinstance(opt_k, int) and 1 <= opt_k <= k_max):
        raise EngineBuildError(f"need 1 <= opt_k <= k_max, got opt_k={opt_k}, k_max={k_max}")
    if not (isinstance(encoder_max, int) and encoder_max >= 1):
        raise EngineBuildError(f"encoder_max must be a positive integer, got {encoder_max!r}")
    plan = Plan.open(plan_path)
    out_path = Path(out) if out is not None else Path(plan_path)
    cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache_path(out_path)
    try:
        fl = trt_compat.load(flavour)
        targets = fl.resolve_targets(compute_capabilities)
    except (trt_compat.TensorRTNotInstalled, ValueError, RuntimeError) as e:
        raise EngineBuildError(str(e)) from e
    trt = fl.trt
    precision = "fp32" if fp32 else "fp16"
    key = engine_key(fl.name, fl.version, precision, targets)

    from tqdm import tqdm
    say = echo or (lambda s: tqdm.write(s))
    say(f"msld build: {plan_path} -> {out_path}: {fl.display}, {precision}, compute capability "
        f"{', '.join(targets)}, k_max {k_max} (opt {opt_k}); key {key}")
    logger = fl.logger()
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # full TensorRT without a GPU/driver fails here
        raise EngineBuildError(f"{fl.display} cannot create a builder here: {e}") from e
    if builder is None:
        raise EngineBuildError(f"{fl.display} cannot create a builder here (see the messages above)")

    batches = {"encoder": (1, 1, encoder_max), "denoiser": (1, opt_k, k_max), "decoder": (1, opt_k, k_max)}
    new_blobs, profiles, seconds, shas = {}, {}, {}, {}
    cache = None
    bar = tqdm(GRAPH_PARTS, desc="msld build", unit="part", disable=not progress, leave=False)
    for part in bar:
        bar.set_postfix_str(part)
        t0 = time.perf_counter()
        graph = plan.blob(part) if fp32 else convert_to_fp16(plan.blob(part))
        network = fl.create_network(builder)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graph):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"{fl.display} cannot parse the {part} graph: {errs}")
        config = builder.create_builder_config()
        fl.set_targets(config, targets)
        if fl.timing_cache_supported:
            if cache is None:
                cache = fl.load_timing_cache(config, cache_path)
            else:
                config.set_timing_cache(cache, False)
        prof_shapes = _profiles(network, *batches[part])
        profile = builder.create_optimization_profile()
        for name, s in prof_shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"{fl.display} failed to build the {part} engine (see the messages above)")
        data = bytes(memoryview(serialized))
        if cache is not None:
            fl.save_timing_cache(config, cache_path)
        seconds[part] = round(time.perf_counter() - t0, 3)
        name = engine_blob_name(key, part)
        new_blobs[name] = (name, data)
        profiles[part] = prof_shapes
        shas[part] = sha256_bytes(data)
        say(f"  {part}: {seconds[part]:.1f} s, engine {len(data) / 1e6:.2f} MB")
    bar.close()

    entry = {
        "key": key,
        "flavour": fl.name,
        "version": fl.version,
        "precision": precision,
        "fp16_ops": None if fp32 else list(LOW_PRECISION_OPS),
        "compute_capabilities": targets,
        "profiles": profiles,
        "blobs": {part: engine_blob_name(key, part) for part in GRAPH_PARTS},
        "sha256": shas,
        "source_sha256": {part: plan.manifest["blobs"][part]["sha256"] for part in GRAPH_PARTS},
        "build_seconds": seconds,
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timing_cache": fl.timing_cache_note,
    }
    engines = [e for e in (plan.manifest.get("engines") or []) if not (isinstance(e, dict) and e.get("key") == key)]
    engines.append(entry)
    add_blobs(plan_path, new_blobs, {"engines": engines}, out_path=out_path)
    cache_msg = f"timing cache {cache_path}" if cache is not None else f"timing cache {fl.timing_cache_note}"
    say(f"msld build: wrote {len(new_blobs)} engines ({sum(len(d) for _, d in new_blobs.values()) / 1e6:.2f} MB, "
        f"{sum(seconds.values()):.1f} s) into {out_path}; {cache_msg}")
    return entry
