"""export/msld_export/plan_writing/onnx_passes.py: GroupNorm's InstanceNormalization rewritten as LayerNormalization."""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from msld_export.plan_writing.onnx_passes import group_norm_as_layer_norm  # noqa: E402


def _ops(data: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(data).graph.node]


def _groupnorm_onnx(channels=16, groups=4, size=12) -> tuple[torch.nn.Module, bytes]:
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.GroupNorm(groups, channels),
                              torch.nn.SiLU()).eval()
    with torch.no_grad():  # a non-trivial affine, so that the per-channel Mul/Add are checked too
        mod[1].weight.uniform_(0.5, 1.5)
        mod[1].bias.uniform_(-0.5, 0.5)
    f = io.BytesIO()
    torch.onnx.export(mod, (torch.randn(2, 3, size, size),), f, input_names=["x"], output_names=["y"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), dynamo=True,
                      opset_version=18, external_data=False, verbose=False)
    return mod, f.getvalue()


def test_groupnorm_becomes_layernorm_with_the_same_output():
    mod, data = _groupnorm_onnx()
    assert "InstanceNormalization" in _ops(data)
    new = group_norm_as_layer_norm(data)
    assert "InstanceNormalization" not in _ops(new) and _ops(new).count("LayerNormalization") == 1
    onnx.checker.check_model(onnx.load_from_string(new), full_check=True)
    # the exporter's shape annotations survive the rewrite
    assert len(onnx.load_from_string(new).graph.value_info) == len(onnx.load_from_string(data).graph.value_info)
    x = np.random.default_rng(1).standard_normal((5, 3, 12, 12)).astype(np.float32)  # another batch size
    got = ort.InferenceSession(new, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        ref = mod(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the identity scale/bias of the old node are gone, one all-ones scale is added
    names = [i.name for i in onnx.load_from_string(new).graph.initializer]
    assert names.count("layer_norm_ones_576") == 1  # (16 / 4 channels) x 12 x 12


def test_instance_norm_with_a_real_affine_is_left_alone():
    from onnx import TensorProto, helper, numpy_helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 10])
    inits = [numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "s"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)
    data = helper.make_model(helper.make_graph([node], "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    assert _ops(group_norm_as_layer_norm(data)) == ["InstanceNormalization"]


def test_exported_plans_carry_no_instance_norm(tiny_plan):
    from msld_sdk.plan import Plan
    plan = Plan.open(tiny_plan)
    for part in ("encoder", "denoiser", "decoder"):
        ops = _ops(plan.blob(part))
        assert "InstanceNormalization" not in ops and "LayerNormalization" in ops, part
