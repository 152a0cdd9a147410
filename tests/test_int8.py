"""The optional int8 denoiser: made by msld_export.plan_writing.quantize_int8, chosen with precision="int8"."""
import json
import logging
import shutil

import numpy as np
import pytest

from msld_sdk import BackendUnavailableError, PrecisionUnavailableError, Segmenter
from msld_sdk.cli import main
from msld_sdk.tools.cpu_features import ISA_FLAGS, KERNEL_ENV, describe, int8_kernel_path
from msld_sdk.segmenter import shipped_plan_path
from msld_sdk.evaluation.metrics import hypothesis_spread
from msld_sdk.plan import Plan


@pytest.fixture(scope="module")
def int8_plan(tiny_plan, tmp_path_factory):
    from msld_export.plan_writing.quantize_int8 import add_int8_denoiser
    p = tmp_path_factory.mktemp("int8") / "tiny_int8.plan"
    shutil.copy(tiny_plan, p)
    rng = np.random.default_rng(0)
    add_int8_denoiser(p, [rng.random((32, 32), dtype=np.float32) for _ in range(6)], {"kind": "random"})
    return p


@pytest.fixture(scope="module")
def int8_plan_8bit(tiny_plan, tmp_path_factory):
    """An int8 plan as made before 7-bit weights: full-range int8 weights, no reduce_range mark."""
    from msld_export.plan_writing.quantize_int8 import add_int8_denoiser
    p = tmp_path_factory.mktemp("int8") / "tiny_int8_8bit.plan"
    shutil.copy(tiny_plan, p)
    rng = np.random.default_rng(0)
    add_int8_denoiser(p, [rng.random((32, 32), dtype=np.float32) for _ in range(6)], {"kind": "random"},
                      reduce_range=False)
    return p


SAFE = int8_kernel_path(saturation_safe=True)      # this CPU's path for a 7-bit (reduce_range) int8 graph


def test_int8_plan_keeps_fp32_results_and_records_how_it_was_made(tiny_plan, int8_plan, rng):
    img = rng.random((40, 30), dtype=np.float32)
    before = Segmenter(tiny_plan).run(img, k=3, steps=4, seed=5)
    after = Segmenter(int8_plan).run(img, k=3, steps=4, seed=5)
    np.testing.assert_array_equal(before.probs, after.probs)          # fp32 stays the default, untouched
    plan = Plan.open(int8_plan)
    e = plan.manifest["int8"]
    assert e["denoiser"] in plan.blob_names() and e["calibration"]["feeds"] == plan.defaults["steps"]  # one batch
    assert 0.0 < e["eps_max_rel_err_on_calibration"] < 10  # random tiny weights quantize badly; real plans: README
    assert plan.blob(e["denoiser"]) != plan.blob("denoiser")


def test_int8_quantizes_convolutions_but_keeps_the_output_convolution_fp32(int8_plan):
    import onnx
    plan = Plan.open(int8_plan)
    g = onnx.load_from_string(plan.blob(plan.manifest["int8"]["denoiser"])).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    weight_source = [made_by.get(n.input[1], "initializer") for n in g.node if n.op_type == "Conv"]
    assert weight_source[-1] == "initializer"                                   # the output conv: fp32 weights
    assert weight_source[:-1] and set(weight_source[:-1]) == {"DequantizeLinear"}  # every other conv: int8


def test_int8_runs_close_to_fp32(int8_plan, rng, caplog):
    """"Close" means: int8 moves each hypothesis less than drawing another hypothesis does. The
    sampler's own spread is the scale of the result's uncertainty, on any CPU and for any model."""
    img = rng.random((32, 32), dtype=np.float32)
    ref = Segmenter(int8_plan).run(img, k=4, steps=6, seed=1)
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        seg = Segmenter(int8_plan, precision="int8")
    assert "int8 denoiser" in caplog.text and "TensorRT not considered" in caplog.text
    assert f"int8 kernels: {SAFE.name} (" in caplog.text        # which kernel path, and why
    assert seg.backend.int8_kernel == SAFE
    assert seg.backend.precision == "int8" and "precision='int8'" in repr(seg)
    q = seg.run(img, k=4, steps=6, seed=1)
    assert q.probs.shape == ref.probs.shape
    diff = np.abs(q.probs - ref.probs)
    assert diff.max() > 0                                   # it really ran another graph ...
    assert diff.mean() < hypothesis_spread(ref.probs)       # ... whose change is within the sampler's own spread


def test_int8_results_are_the_same_on_every_kernel_path(int8_plan, rng, monkeypatch):
    """ONNX Runtime's fast u8s8 kernels forced (``fast``: on a CPU without VNNI, the VPMADDUBSW
    kernels that add pairs of products in saturating 16 bits; with VNNI, the 32-bit ones), its
    exact u8u8 kernels (``exact``) and the path the SDK picks (``auto``) give bit-identical int8
    results for a 7-bit int8 graph: no pair sum can saturate, so the integer sums are exact on
    every path and the plan means the same on every x86 CPU."""
    img = rng.random((32, 32), dtype=np.float32)
    plan = Plan.open(int8_plan)
    assert plan.manifest["int8"]["reduce_range"] is True and plan.manifest["int8"]["pair_sum_max"] <= 32767
    auto = Segmenter(int8_plan, precision="int8")
    assert auto.backend.int8_kernel == SAFE and not SAFE.slower_than_fp32
    want = auto.run(img, k=4, steps=6, seed=2).probs
    for mode, config in (("fast", {}), ("exact", {"session.x64quantprecision": "1"})):
        monkeypatch.setenv(KERNEL_ENV, mode)
        seg = Segmenter(int8_plan, precision="int8")
        assert seg.backend.int8_kernel.session_config == config
        np.testing.assert_array_equal(seg.run(img, k=4, steps=6, seed=2).probs, want, err_msg=mode)


def test_int8_plans_without_7bit_weights_keep_the_cpu_rule(int8_plan_8bit, rng, monkeypatch):
    """A plan quantized with full-range int8 weights (before 2026-12-03, or reduce_range=False) is
    not marked; it gets the old rule (exact u8u8 kernels on a CPU without VNNI), whose results
    equal the exact path's everywhere."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    e = Plan.open(int8_plan_8bit).manifest["int8"]
    assert e["reduce_range"] is False and e["pair_sum_max"] == 2 * 255 * 127
    seg = Segmenter(int8_plan_8bit, precision="int8")
    assert seg.backend.int8_kernel == int8_kernel_path(saturation_safe=False)
    img = rng.random((32, 32), dtype=np.float32)
    monkeypatch.setenv(KERNEL_ENV, "exact")
    np.testing.assert_array_equal(Segmenter(int8_plan_8bit, precision="int8").run(img, k=2, steps=3, seed=1).probs,
                                  seg.run(img, k=2, steps=3, seed=1).probs)


@pytest.mark.parametrize("name", ["lidc", "polyp"])
def test_shipped_int8_graphs_cannot_saturate_16_bit_pair_sums(name):
    """From the shipped int8 graph itself: every quantized convolution or matrix product that
    multiplies an activation by a weight takes uint8 activations (0..255) and int8 weights with
    |w| <= 64, so two adjacent products sum to at most 2 x 255 x 64 = 32640 <= 32767 and
    VPMADDUBSW (CPUs without VNNI) cannot saturate.  Products of two activations run on u8u8
    kernels, which widen to 16 bits first and cannot saturate either."""
    import onnx
    from msld_export.plan_writing.quantize_int8 import pair_sum_bounds
    plan = Plan.open(shipped_plan_path(name))
    e = plan.manifest["int8"]
    graph_bytes = plan.blob(e["denoiser"])
    bounds = pair_sum_bounds(graph_bytes)
    g = onnx.load_from_string(graph_bytes).graph
    int8_weights = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.INT8}
    dq_of_weight = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights}
    with_int8_weights = [n.name for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm")
                         and any(i in dq_of_weight for i in n.input)]
    assert sorted(b["node"] for b in bounds) == sorted(with_int8_weights) and len(bounds) > 10  # every one checked
    assert {b["activation_max"] for b in bounds} == {255}                 # uint8 activations
    assert max(b["weight_max_abs"] for b in bounds) <= 64                 # 7-bit weights
    assert max(b["pair_sum_max"] for b in bounds) == e["pair_sum_max"] <= 32767
    assert e["reduce_range"] is True                                       # the mark the SDK reads
    assert int8_kernel_path(saturation_safe=True).session_config == {} or int8_kernel_path().name == "default"


@pytest.mark.parametrize("name", ["lidc", "polyp"])
def test_shipped_int8_plans_give_the_same_results_on_the_fast_and_the_exact_kernels(name, monkeypatch, rng):
    img = rng.random((48, 48), dtype=np.float32)
    if name == "polyp":
        img = rng.random((48, 48, 3), dtype=np.float32)
    out = {}
    for mode in ("fast", "exact"):
        monkeypatch.setenv(KERNEL_ENV, mode)
        out[mode] = Segmenter(name, backend="onnxruntime", precision="int8").run(img, k=2, steps=3, seed=4).probs
    np.testing.assert_array_equal(out["fast"], out["exact"])


def _conv_model(w: np.ndarray) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    co, ci, kh, kw = w.shape
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ci, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _conv_error(mode, tmp_path, monkeypatch, reduce_range=True):
    """One convolution quantized by the shipped recipe (``reduce_range=False``: full-range 8-bit
    weights, as before 2026-12-03), run on the int8 kernel path ``mode``, against float64 on
    inputs chosen to saturate 16-bit pair sums: activations at the top of their range (uint8
    255) times weights at the top of theirs (127, or 64 with 7-bit weights).  Returns the error,
    the bound quantization itself allows per output (sum |w| s_a/2 + sum |x| s_w/2 + K s_a s_w/4
    for the inputs, s_y/2 for the output) and the largest |stored weight|."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from msld_export.plan_writing.quantize_int8 import quantize_denoiser
    from msld_sdk.backends.onnxruntime_backend import session_options
    monkeypatch.setenv(KERNEL_ENV, mode)
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (4, 16, 3, 3)).astype(np.float32)
    w[0], w[1] = 1.0, -1.0                               # whole channels at the weight range's ends
    x = rng.uniform(0, 1, (1, 16, 8, 8)).astype(np.float32)
    x[:, :8] = 1.0                                       # half the input at the activation range's top
    q = quantize_denoiser(_conv_model(w), [{"x": x}], keep_fp32=[], reduce_range=reduce_range)
    graph = onnx.load_from_string(q).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 1 and ops.count("QuantizeLinear") >= 2
    dq_of = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    s_a = float(init[dq_of[conv.input[0]].input[1]])
    wq_node = dq_of[conv.input[1]]
    s_w = init[wq_node.input[1]].astype(np.float64)                       # per output channel
    w_max = int(np.abs(init[wq_node.input[0]].astype(int)).max())
    s_y = float(init[next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
                     .input[1]])

    so = session_options(None, int8_kernel_path(saturation_safe=reduce_range).session_config)  # the backend's
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(q, so, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]  # integer kernel
    got = sess.run(None, {"x": x})[0].astype(np.float64)

    xt, wt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    want = torch.nn.functional.conv2d(xt, wt, padding=1).numpy()
    abs_w = torch.from_numpy(np.abs(w).astype(np.float64))
    ones = torch.ones_like(xt)
    k_eff = torch.nn.functional.conv2d(ones, torch.ones_like(wt[:1]), padding=1).numpy()   # taps inside the image
    s_w4 = s_w.reshape(1, -1, 1, 1)
    bound = (torch.nn.functional.conv2d(ones, abs_w, padding=1).numpy() * s_a / 2
             + torch.nn.functional.conv2d(xt.abs(), torch.ones_like(wt), padding=1).numpy() * s_w4 / 2
             + k_eff * s_a * s_w4 / 4 + s_y / 2) * (1 + 1e-5) + 1e-6
    return np.abs(got - want), bound, w_max


@pytest.mark.parametrize("mode", ["auto", "exact", "fast"])
def test_int8_convolution_stays_within_its_quantization_error_bound(mode, tmp_path, monkeypatch):
    """7-bit weights: 2 x 255 x 64 = 32640 a pair, within int16, so every path, the fast u8s8
    kernels of a CPU without VNNI included, stays within the bound."""
    err, bound, w_max = _conv_error(mode, tmp_path, monkeypatch)
    assert w_max == 64                                                     # 7-bit weights, range's end reached
    assert (err <= bound).all(), f"worst error {err.max():.3f} where the bound is {bound.flat[err.argmax()]:.3f}"


def test_full_range_int8_weights_stay_within_the_bound_on_the_exact_path(tmp_path, monkeypatch):
    """Full-range weights (2 x 255 x 127 = 64770 a pair) on the exact u8u8 path the SDK picks for
    such plans on a CPU without VNNI: within the bound on every CPU."""
    err, bound, w_max = _conv_error("exact", tmp_path, monkeypatch, reduce_range=False)
    assert w_max == 127 and (err <= bound).all()


def test_full_range_int8_weights_saturate_the_fast_kernels_without_vnni(tmp_path, monkeypatch):
    """Why the 7-bit weights: with full-range ones the fast u8s8 kernels of a CPU without VNNI
    miss the bound (~1 per pair, 32003 s_a s_w, 72 pairs an output). Runs only on such a CPU."""
    if int8_kernel_path(mode="fast").name != "u8s8-16bit":
        pytest.skip(f"this CPU's fast kernels do not saturate: {int8_kernel_path(mode='fast').name}")
    err, bound, _ = _conv_error("fast", tmp_path, monkeypatch, reduce_range=False)
    assert (err > bound).any()


def test_int8_kernel_path_follows_the_cpu_and_the_plan(monkeypatch):
    """VNNI: ONNX Runtime's default u8s8 kernels (exact).  No VNNI or unknown: the fast u8s8 ones
    for a 7-bit (saturation-safe) int8 graph, the exact u8u8 ones for any other."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    isa = {f: False for f in ISA_FLAGS}
    avx2 = {"model": "AVX2 CPU", "arch": "x86_64", "isa": {**isa, "avx2": True, "fma": True}}
    vnni = {"model": "VNNI CPU", "arch": "x86_64", "isa": {**isa, "avx2": True, "avx512f": True, "avx512_vnni": True}}
    assert int8_kernel_path(avx2).session_config == {"session.x64quantprecision": "1"}
    assert "saturate" in int8_kernel_path(avx2).reason
    assert int8_kernel_path(avx2).slower_than_fp32 and not int8_kernel_path(vnni).slower_than_fp32
    assert int8_kernel_path(vnni).session_config == {} and int8_kernel_path(vnni).name == "u8s8-vnni"
    assert int8_kernel_path({**avx2, "isa": None}).session_config == {"session.x64quantprecision": "1"}
    assert int8_kernel_path({**avx2, "arch": "aarch64"}).session_config == {}
    assert int8_kernel_path(vnni, mode="exact").session_config == {"session.x64quantprecision": "1"}
    with pytest.raises(ValueError, match=KERNEL_ENV):
        int8_kernel_path(vnni, mode="turbo")
    for info in (avx2, {**avx2, "isa": None}):                 # 7-bit graphs: fast kernels everywhere, and why
        safe = int8_kernel_path(info, saturation_safe=True)
        assert safe.name == "u8s8-7bit" and safe.session_config == {} and not safe.slower_than_fp32
        assert "2 x 255 x 64 = 32640" in safe.reason and "reduce_range" in safe.reason
    assert int8_kernel_path(vnni, saturation_safe=True).name == "u8s8-vnni"
    assert int8_kernel_path(avx2, mode="exact", saturation_safe=True).name == "u8u8-exact"
    fast = int8_kernel_path(avx2, mode="fast")
    assert fast.name == "u8s8-16bit" and fast.session_config == {} and "saturate" in fast.reason
    assert "AVX512-VNNI" in describe(vnni) and "AVX-512" not in describe(avx2)


def test_int8_errors_name_the_fix(tiny_plan, int8_plan):
    with pytest.raises(PrecisionUnavailableError, match="msld_export.plan_writing.quantize_int8"):
        Segmenter(tiny_plan, precision="int8")
    with pytest.raises(PrecisionUnavailableError, match="precision must be one of"):
        Segmenter(int8_plan, precision="fp16")
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime only"):
        Segmenter(int8_plan, backend="tensorrt", precision="int8")


def test_bench_command_reports_int8_denoiser(int8_plan, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--plan", str(int8_plan), "--k", "2", "--steps", "2", "--repeats", "2", "-q",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["k"] == 2 and r["steps"] == 2 and r["sdk_ms"] > 0 and 0 <= r["overhead_fraction"] < 1
    assert r["rows"][0]["stages_ms"]["denoise_ms"] > 0
    q = r["int8_denoiser"]
    assert q["batch"] == 2 and q["fp32_ms"] > 0 and q["int8_ms"] > 0 and q["eps_max_abs_diff"] > 0
    assert q["int8_kernel"] == SAFE.name and q["int8_kernel_reason"] == SAFE.reason   # the path, and why
    if q["int8_kernel"] in ("u8s8-vnni", "u8s8-7bit"):          # the exact u8u8 path is timed too
        assert q["int8_u8u8_ms"] > 0 and q["u8u8_equals_own_path"] is True
    m = r["machine"]                                   # figures from different CPUs are never compared blind
    assert m["cpu"] and (m["isa"] is None or set(m["isa"]) == set(ISA_FLAGS))
    assert m["int8_kernel"] == SAFE.name
    out = capsys.readouterr().out
    assert "int8" in out and f"CPU: {describe()}" in out
    assert main(["segment", str(tmp_path / "none.png"), "--plan", str(int8_plan), "--precision", "int8"]) == 1
