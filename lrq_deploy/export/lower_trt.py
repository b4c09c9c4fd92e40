"""Lowering for TensorRT (`--target trt`), and the way back to standard ops.

- Symmetric INT4 weight-only layers take TensorRT's native path: an INT4 initializer and a
  zero-free block DequantizeLinear (lower_ort.lower_standard with signed codes).
- Every other layer becomes one node in the `lrq` domain named after its plugin (W4A4Linear,
  W2A16Linear, ...), carrying the scheme's attributes (QuantScheme.to_attributes) and the layer's
  shape, with the checkpoint's packed weights and uint8 zero points (both stored as INT8 bytes:
  TensorRT's parser widens UINT8 initializers to INT32) and float16 scales as inputs.

`ort_reference` turns such a graph back into the standard ops of `--target ort`, from the nodes'
own bytes, so that TensorRT engines are checked against onnxruntime (build-engine --verify).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrq_deploy.export.graph import (
    MIN_OPSET, Graph, QuantNode, attributes, default_opset, drop_domain, float_layers, set_nodes, set_opset,
)
from lrq_deploy.export.lower_float import FLOAT_OPSET, TRT_DOMAIN, lower_float_trt, ort_form_of_trt_layer
from lrq_deploy.export.lower_ort import lower_for_ort, lower_standard
from lrq_deploy.quant.scheme import DOMAIN, layer_attributes


def lower_for_trt(graph: Graph, qn: QuantNode, prefix: str) -> list:
    if qn.scheme.float_format:
        return lower_float_trt(graph, qn, prefix)
    if qn.scheme.native_int4:
        return lower_standard(graph, qn, prefix, signed_int4=True)
    return _plugin_node(graph, qn, prefix)


def _as_int8_bytes(graph: Graph, name: str, prefix: str) -> str:
    """The same bytes as an INT8 initializer (the plugin reads them back as uint8)."""
    array = graph.array(name)
    return graph.add_init(numpy_helper.from_array(array.view(np.int8), f"{prefix}.{name.rsplit('.', 1)[-1]}_bytes"))


def _plugin_node(graph: Graph, qn: QuantNode, prefix: str) -> list:
    inputs = list(qn.node.input)
    inputs[1], inputs[3] = _as_int8_bytes(graph, inputs[1], prefix), _as_int8_bytes(graph, inputs[3], prefix)
    out_features = graph.array(qn.node.input[1]).shape[0]
    node = helper.make_node(
        qn.scheme.plugin_name, inputs, list(qn.node.output), name=prefix, domain=DOMAIN,
        **qn.scheme.to_attributes(), in_features=qn.in_features, out_features=out_features,
        plugin_namespace=DOMAIN, aot=1,
    )
    return [node]


def ort_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A `--target trt` graph made runnable by onnxruntime: each lrq plugin node becomes the
    standard ops `--target ort` writes. Native INT4 nodes are standard already."""
    graph = Graph(model)
    new_nodes, opset = [], default_opset(model)
    floats = {entry["prefix"]: entry for entry in float_layers(model)}
    pending = dict(floats)
    for index, node in enumerate(model.graph.node):
        prefix = node.name.rsplit(".", 1)[0]
        if prefix in floats:  # a TensorRT float layer: its onnxruntime form once, where its first node was
            if prefix in pending:
                new_nodes += ort_form_of_trt_layer(graph, pending.pop(prefix))
                opset = max(opset, FLOAT_OPSET["ort"])
            continue
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        scheme, in_features, _ = layer_attributes(attributes(node), f"node {node.name}")
        opset = max(opset, MIN_OPSET[scheme.wbits])
        inputs = list(node.input)
        for i in (1, 3):  # uint8 bytes carried as INT8
            inputs[i] = graph.const(f"lrq_reference_{index}.{i}", graph.array(inputs[i]).view(np.uint8))
        qn = QuantNode(helper.make_node("QuantLinear", inputs, list(node.output), domain=DOMAIN), scheme, in_features)
        new_nodes += lower_for_ort(graph, qn, f"lrq_reference_{index}")
    set_nodes(model, new_nodes)
    graph.drop_unused_initializers()
    drop_domain(model)
    drop_domain(model, TRT_DOMAIN)
    set_opset(model, opset)
    return model
