"""The lrq.QuantLinear node contract and the graph editing every lowering shares.

An lrq.QuantLinear node (export/ops.py) has inputs x, packed codes [out, in / per_byte] (uint8),
scales [out, groups], zero points [out, groups] (uint8) and an optional bias; its attributes are
the scheme's (QuantScheme.to_attributes) plus in_features. Lowerings read it as a QuantNode.
"""

from __future__ import annotations

import json

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.pack import pack_array, unpack_array
from lrq_deploy.quant.scheme import DOMAIN, QuantScheme

MICROSOFT = "com.microsoft"  # onnxruntime's contrib-operator domain
FLOAT_LAYERS_KEY = "lrq.float_layers"  # metadata: the float-grid layers of a --target trt graph (lower_float.py)

# Minimum opset of a DequantizeLinear per weight type (block-wise DQ and INT4/UINT4: 21, INT2/UINT2: 25).
MIN_OPSET = {2: 25, 3: 21, 4: 21, 6: 21, 8: 21, 16: 18}


@dataclass(frozen=True)
class QuantNode:
    """One lrq.QuantLinear node with its scheme and input width."""

    node: onnx.NodeProto
    scheme: QuantScheme
    in_features: int

    @property
    def has_bias(self) -> bool:
        return len(self.node.input) > 4 and bool(self.node.input[4])


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def as_quant_node(node: onnx.NodeProto) -> QuantNode | None:
    if node.domain != DOMAIN or node.op_type != "QuantLinear":
        return None
    attrs = attributes(node)
    return QuantNode(node, QuantScheme.from_attributes(attrs, f"node {node.name}"), int(attrs["in_features"]))


def quant_nodes(model: onnx.ModelProto) -> list[QuantNode]:
    return [qn for qn in map(as_quant_node, model.graph.node) if qn is not None]


def float_layers(model: onnx.ModelProto) -> list[dict]:
    """The float-grid layers a --target trt graph records (prefix, input, output, bias, scheme)."""
    value = next((p.value for p in model.metadata_props if p.key == FLOAT_LAYERS_KEY), None)
    return json.loads(value) if value else []


def summarized_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """A graph's metadata, the per-layer record of its float layers as their count."""
    metadata = {p.key: p.value for p in model.metadata_props}
    if FLOAT_LAYERS_KEY in metadata:
        metadata[FLOAT_LAYERS_KEY] = f"{len(float_layers(model))} layers"
    return metadata


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


def drop_domain(model: onnx.ModelProto, domain: str = DOMAIN) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def packed_tensor(name: str, codes: np.ndarray, bits: int, data_type: int) -> TensorProto:
    """An ONNX tensor of sub-byte (or byte) codes, packed as ONNX lays them out (quant/pack.py)."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(codes.shape)
    tensor.raw_data = pack_array(codes, bits)
    return tensor


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node computing each tensor (graph inputs and initializers have none)."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor (an empty list for a tensor nobody reads)."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's node list (nodes kept in topological order by the caller)."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def drop_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove the nodes whose outputs reach no graph output; returns how many were removed."""
    live = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(out in live for out in node.output):
            kept.append(node)
            live.update(node.input)
    removed = len(model.graph.node) - len(kept)
    set_nodes(model, kept[::-1])
    return removed


class Graph:
    """Initializer lookup and node/initializer replacement on a model being lowered."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise LrqError(f"exported graph lost the constant {name!r}; cannot lower it")
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, tensor: TensorProto) -> str:
        self.model.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name

    def const(self, name: str, value) -> str:
        return self.add_init(numpy_helper.from_array(np.asarray(value), name))

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.model.graph.node for i in n.input} | {o.name for o in self.model.graph.output}
        keep = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)


def codes_and_params(graph: Graph, qn: QuantNode):
    """(codes [out, in] int, scales [out, groups] float32, zeros [out, groups] int) from the node's inputs."""
    codes = unpack_array(graph.array(qn.node.input[1]), qn.scheme.wbits)[:, : qn.in_features]
    return codes, graph.array(qn.node.input[2]).astype(np.float32), graph.array(qn.node.input[3])
