"""Lowering for onnxruntime (`--target ort`), standard form: per-token fake-quantized
activations, then MatMul with the block-wise DequantizeLinear of the packed weight codes
(UINT4 / UINT2 / UINT8, or signed INT4 without zero points for TensorRT's native path). Layers
an integer kernel serves take the integer form (lower_integer.py) instead."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from lrq_deploy.export.activations import activation_quant
from lrq_deploy.export.graph import Graph, QuantNode, codes_and_params, packed_tensor
from lrq_deploy.export.lower_float import lower_float_ort
from lrq_deploy.export.lower_integer import lower_integer
from lrq_deploy.quant.scheme import KernelFamily

_ONNX_TYPE = {2: TensorProto.UINT2, 3: TensorProto.UINT4, 4: TensorProto.UINT4, 6: TensorProto.UINT8, 8: TensorProto.UINT8}


def lower_for_ort(graph: Graph, qn: QuantNode, prefix: str) -> list:
    """The integer form where an integer kernel serves the scheme, the float form for float grids,
    the standard form otherwise."""
    if qn.scheme.float_format:
        return lower_float_ort(graph, qn, prefix)
    if qn.scheme.kernel is KernelFamily.INTEGER:
        return lower_integer(graph, qn, prefix)
    # Symmetric 4-bit weights as signed INT4 codes without zero points (the zero point is 8 for
    # every group): the same dequantized weight, one input less, and MatMulNBits without zero points.
    return lower_standard(graph, qn, prefix, signed_int4=qn.scheme.native_int4, matmulnbits_blocks=True)


MATMULNBITS_BLOCKS = (256, 128, 64, 32, 16)  # block sizes onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits


def matmulnbits_block(in_features: int) -> int | None:
    """The largest block onnxruntime's MatMulNBits takes that divides the input width (None: none does)."""
    return next((b for b in MATMULNBITS_BLOCKS if in_features % b == 0), None)


def _dequantized_weight(graph: Graph, qn: QuantNode, prefix: str, signed_int4: bool,
                        matmulnbits_blocks: bool = False) -> tuple[list, str]:
    codes, scales, zeros = codes_and_params(graph, qn)
    group = qn.scheme.group_length(qn.in_features)
    block = matmulnbits_block(qn.in_features) if matmulnbits_blocks else None
    if qn.scheme.group_size is None and qn.scheme.wbits == 4 and block is not None and block < group:
        # Per-channel 4-bit weights as blocks of one scale repeated: the same dequantized weight,
        # and a block size onnxruntime fuses into MatMulNBits (a 192- or 11008-wide block it
        # does not, and would dequantize the whole weight to fp32 at every step instead).
        repeats = group // block
        scales, zeros, group = np.repeat(scales, repeats, axis=1), np.repeat(zeros, repeats, axis=1), block
    codes_t, scales_t, zeros_t = codes.T, scales.T, zeros.T  # [in, out], [groups, out]
    inputs = []
    if signed_int4:
        w = packed_tensor(f"{prefix}.weight_int4", codes_t.astype(np.int16) - 8, 4, TensorProto.INT4)
        inputs = [graph.add_init(w), graph.const(f"{prefix}.weight_scale", scales_t)]
    else:
        data_type = _ONNX_TYPE[qn.scheme.wbits]
        w = packed_tensor(f"{prefix}.weight_q", codes_t, qn.scheme.wbits, data_type)
        z = packed_tensor(f"{prefix}.zero_point", zeros_t, qn.scheme.wbits, data_type)
        inputs = [graph.add_init(w), graph.const(f"{prefix}.weight_scale", scales_t), graph.add_init(z)]
    node = helper.make_node(
        "DequantizeLinear", inputs, [f"{prefix}.weight"], name=f"{prefix}.dq", axis=0, block_size=group
    )
    return [node], f"{prefix}.weight"


def lower_standard(graph: Graph, qn: QuantNode, prefix: str, signed_int4: bool = False,
                   matmulnbits_blocks: bool = False) -> list:
    x, y = qn.node.input[0], qn.node.output[0]
    nodes = []
    if qn.scheme.abits < 16:
        act_nodes, x = activation_quant(graph, prefix, x, qn.scheme.abits, qn.scheme.act_asym)
        nodes += act_nodes
    if qn.scheme.wbits < 16:
        weight_nodes, weight = _dequantized_weight(graph, qn, prefix, signed_int4, matmulnbits_blocks)
        nodes += weight_nodes
    else:
        weight = graph.const(f"{prefix}.weight_t", graph.array(qn.node.input[1]).T.copy())
    has_bias = qn.has_bias
    nodes.append(helper.make_node("MatMul", [x, weight], [f"{prefix}.mm" if has_bias else y], name=f"{prefix}.matmul"))
    if has_bias:
        nodes.append(helper.make_node("Add", [f"{prefix}.mm", qn.node.input[4]], [y], name=f"{prefix}.bias"))
    return nodes
