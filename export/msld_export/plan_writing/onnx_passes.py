"""Graph rewrites applied to every exported ONNX graph before it is checked and stored.

Each pass returns an equivalent graph that ONNX Runtime runs faster on the CPU; the export
still compares the rewritten graph's outputs with PyTorch (``export_plan.RTOL``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference


def group_norm_as_layer_norm(model_bytes: bytes) -> bytes:
    """Rewrite GroupNorm's ``InstanceNormalization`` as ``LayerNormalization``.

    torch exports GroupNorm as Reshape(B, G, -1) -> InstanceNormalization(scale 1, bias 0) ->
    Reshape -> per-channel Mul/Add.  On that (B, G, L) tensor, normalising each of the B x G
    rows is exactly LayerNormalization over the last axis, and ONNX Runtime's LayerNormalization
    kernel is faster (at k=8: denoiser call 17.6 -> 17.1 ms, decoder 63.8 -> 60.2 ms on 2 cores,
    outputs equal within 6e-7; benchmarks/README.md).  Only nodes whose input length L is
    static and whose scale/bias are the identity are rewritten; anything else is left alone."""
    inferred = shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    model = onnx.load_from_string(model_bytes)  # rewritten as the exporter wrote it, value_info kept
    inits = {i.name: i for i in model.graph.initializer}
    ones = {}  # one all-ones scale per row length, shared by the nodes that need it (no bias)
    for node in model.graph.node:
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        scale, bias = inits.get(node.input[1]), inits.get(node.input[2])
        shape = shapes.get(node.input[0])
        if scale is None or bias is None or shape is None or len(shape.dim) != 3:
            continue
        if not (np.all(numpy_helper.to_array(scale) == 1) and np.all(numpy_helper.to_array(bias) == 0)):
            continue
        length = shape.dim[2].dim_value
        if length <= 0:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        if length not in ones:
            ones[length] = numpy_helper.from_array(np.ones(length, np.float32), f"layer_norm_ones_{length}")
        node.op_type = "LayerNormalization"
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", -1), helper.make_attribute("epsilon", eps)])
        node.input[:] = [node.input[0], ones[length].name]
    model.graph.initializer.extend(ones.values())
    used = {i for n in model.graph.node for i in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:  # the InstanceNormalization scale/bias constants
        model.graph.initializer.remove(init)
    return model.SerializeToString()
