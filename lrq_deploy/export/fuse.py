"""Fusing quantized linears that read the same input (q/k/v, gate/up) into one lrq.QuantLinear,
before lowering: their codes, scales and zero points are concatenated along the output rows and
a Split hands each consumer its columns back.

Exact: every output column is the same dot product of the same input with the same codes and
scale as before (float grids fuse only linears whose tensor-level scales are equal: they are one
value per layer, not per row) (a per-token activation quantizer sees the same input, so it quantizes it the
same once instead of three times). What changes is the work per step: one weight dequantization,
one GEMM (onnxruntime's MatMulNBits) and one activation quantization instead of two or three.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrq_deploy.export.graph import Graph, QuantNode, as_quant_node, set_nodes


def fuse_shared_inputs(model: onnx.ModelProto) -> int:
    """Fuse every set of lrq.QuantLinear nodes that read one input with one scheme and no bias;
    returns how many nodes were fused away."""
    graph = Graph(model)
    groups: dict[tuple, list[QuantNode]] = defaultdict(list)
    for node in model.graph.node:
        qn = as_quant_node(node)
        if qn is not None and _fusable(graph, qn):
            tensor_scales = graph.array(qn.node.input[3]).tobytes() if qn.scheme.float_format else b""
            groups[(qn.node.input[0], qn.scheme, qn.in_features, tensor_scales)].append(qn)
    replacements: dict[str, list[onnx.NodeProto]] = {}
    removed: set[str] = set()
    for index, members in enumerate(m for m in groups.values() if len(m) > 1):
        first = members[0]
        replacements[first.node.name] = _fused(graph, members, f"lrq_fused_{index}")
        removed.update(m.node.name for m in members[1:])
    if not replacements:
        return 0
    nodes = []
    for node in model.graph.node:
        if node.name in removed:
            continue
        nodes += replacements.get(node.name, [node])
    set_nodes(model, nodes)
    graph.drop_unused_initializers()
    return len(removed)


def _fusable(graph: Graph, qn: QuantNode) -> bool:
    """Whole bytes per row of codes (rows concatenate as they are packed), weights from initializers."""
    inputs = qn.node.input
    return (not qn.has_bias and (qn.in_features * qn.scheme.wbits) % 8 == 0 and qn.node.name != ""
            and all(name in graph.inits for name in inputs[1:4]))


def _fused(graph: Graph, members: list[QuantNode], prefix: str) -> list[onnx.NodeProto]:
    """One node over the concatenated rows, then Split back into the members' outputs (in order)."""
    first = members[0].node
    arrays = [[graph.array(m.node.input[i]) for m in members] for i in (1, 2, 3)]
    names = []
    if members[0].scheme.float_format:  # one [weight tensor scale, input scale] for all (equal by grouping)
        arrays[2] = arrays[2][:1]
    for part, tensors in zip(("qweight", "scales", "zeros"), arrays):
        names.append(graph.add_init(numpy_helper.from_array(np.concatenate(tensors, axis=0), f"{prefix}.{part}")))
    rows = [len(t) for t in arrays[1]]  # scales [out, groups]: one row per output feature
    fused = helper.make_node(first.op_type, [first.input[0], *names], [f"{prefix}.y"], name=prefix,
                             domain=first.domain)
    fused.attribute.extend(first.attribute)
    split = helper.make_node("Split", [f"{prefix}.y", graph.const(f"{prefix}.split", np.array(rows, dtype=np.int64))],
                             [m.node.output[0] for m in members], name=f"{prefix}.split", axis=-1)
    return [fused, split]
