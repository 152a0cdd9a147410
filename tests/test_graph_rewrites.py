"""benchmarks/graph_rewrites.py: the rejected rewrites are exact, so their timings compare
like with like (checked on the tiny test plan's decoder and denoiser)."""
import pytest

onnx = pytest.importorskip("onnx")

from benchmarks.graph_rewrites import group_norm_reduce_form, max_rel_diff, upsample_conv_as_phases  # noqa: E402
from msld_sdk.plan import Plan  # noqa: E402


@pytest.mark.parametrize("how", ["conv_transpose", "depth_to_space"])
@pytest.mark.parametrize("graph", ["decoder", "denoiser"])
def test_upsample_conv_as_phases_is_exact(tiny_plan, graph, how):
    shipped = Plan.open(tiny_plan).blob(graph)
    rewritten, n = upsample_conv_as_phases(shipped, how)
    ops = [nd.op_type for nd in onnx.load_from_string(rewritten).graph.node]
    assert n == 2 and "Resize" not in ops
    assert ("ConvTranspose" if how == "conv_transpose" else "DepthToSpace") in ops
    assert max_rel_diff(shipped, rewritten, batch=3) < 1e-5


def test_group_norm_reduce_form_is_exact(tiny_plan):
    shipped = Plan.open(tiny_plan).blob("denoiser")
    rewritten, n, matmuls = group_norm_reduce_form(shipped)
    ops = [nd.op_type for nd in onnx.load_from_string(rewritten).graph.node]
    assert n == ops.count("Sqrt") > 0 and "LayerNormalization" not in ops and len(matmuls) == 2 * n
    assert max_rel_diff(shipped, rewritten, batch=3) < 1e-5
