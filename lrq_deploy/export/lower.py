"""Lowering of lrq.QuantLinear nodes, by target: standard / integer ONNX ops for onnxruntime
(lower_ort.py, lower_integer.py) or TensorRT's native INT4 path and lrq plugin nodes
(lower_trt.py).

Weights enter the graph as [in, out] so that MatMul consumes the dequantized tensor directly:
codes are re-laid out once, at export. ONNX packs 4-bit and 2-bit tensors little end first over
the flattened tensor, the same order as the checkpoint (quant/pack.py, docs/FORMATS.md).
"""

from __future__ import annotations

import onnx

from lrq_deploy.errors import LrqError
from lrq_deploy.export.graph import MIN_OPSET, Graph, as_quant_node, drop_domain, quant_nodes, set_nodes
from lrq_deploy.export.lower_float import FLOAT_OPSET
from lrq_deploy.export.lower_ort import lower_for_ort
from lrq_deploy.export.lower_trt import lower_for_trt

TARGETS = {"ort": lower_for_ort, "trt": lower_for_trt}


def required_opset(model: onnx.ModelProto, target: str) -> int:
    """The lowest default-domain opset the lowered graph needs (block-wise DequantizeLinear)."""
    return max([18, *(scheme_opset(qn.scheme, target) for qn in quant_nodes(model))])


def scheme_opset(scheme, target: str) -> int:
    """The lowest opset a linear of `scheme` needs once lowered for `target` (None: full precision),
    known from the checkpoint's scheme before anything is traced."""
    if scheme is not None and scheme.float_format:
        return FLOAT_OPSET[target]
    if scheme is None or not (target == "ort" or scheme.native_int4):
        return 18
    return MIN_OPSET[scheme.wbits]


def lower(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """Replace every lrq.QuantLinear node in place; returns the model."""
    if target not in TARGETS:
        raise LrqError(f"unknown export target {target!r} (targets: {', '.join(TARGETS)})")
    lower_node = TARGETS[target]
    graph = Graph(model)
    new_nodes, index = [], 0
    for node in list(model.graph.node):
        qn = as_quant_node(node)
        if qn is None:
            new_nodes.append(node)
            continue
        new_nodes += lower_node(graph, qn, f"lrq_linear_{index}")
        index += 1
    set_nodes(model, new_nodes)
    graph.drop_unused_initializers()
    if target == "ort":
        drop_domain(model)
    return model
