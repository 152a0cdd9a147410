"""Count the floating-point work of an ONNX graph (Conv, MatMul, Gemm, Einsum), for GFLOP/s figures.

A multiply-add counts as 2 FLOPs. Element-wise ops and normalisations are ignored (they are
memory-bound and small here), so the count is a lower bound of the work done.
"""
from __future__ import annotations

import numpy as np


def graph_flops(onnx_bytes: bytes, batch: int) -> int:
    import onnx
    from onnx import shape_inference

    model = onnx.load_from_string(onnx_bytes)
    for inp in model.graph.input:  # pin the dynamic batch axis
        d0 = inp.type.tensor_type.shape.dim[0]
        if d0.dim_param or not d0.dim_value:
            d0.Clear()
            d0.dim_value = batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not w or not out or None in out:
                raise ValueError(f"cannot infer shapes of Conv {node.name}")
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            cout, cin_g = w[0], w[1]
            k = int(np.prod(w[2:]))
            total += 2 * int(np.prod(out)) * cin_g * k
        elif node.op_type in ("MatMul", "Gemm"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if not a or not out or None in a or None in out:
                raise ValueError(f"cannot infer shapes of {node.op_type} {node.name}")
            transa = next((x.i for x in node.attribute if x.name == "transA"), 0)
            kdim = a[-2] if (node.op_type == "Gemm" and transa) else a[-1]
            total += 2 * int(np.prod(out)) * kdim
        elif node.op_type == "Einsum":
            eq = next(a.s.decode() for a in node.attribute if a.name == "equation")
            lhs = eq.replace(" ", "").split("->")[0].split(",")
            sizes = {}
            for term, name in zip(lhs, node.input):
                dims = shapes.get(name)
                if not dims or None in dims or len(dims) != len(term):
                    raise ValueError(f"cannot infer shapes of Einsum {node.name}")
                sizes.update(zip(term, dims))
            total += 2 * int(np.prod(list(sizes.values())))  # every index combination: one multiply-add
    return total
