"""Lowering for onnxruntime, integer form: layers the integer kernels serve (quantized
activations, weight codes that fit a byte) run as exact int32 MatMulInteger GEMMs, equal to the
reference at every onnxruntime optimization level."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from lrq_deploy.export.activations import activation_codes
from lrq_deploy.export.graph import Graph, QuantNode, codes_and_params, packed_tensor


def lower_integer(graph: Graph, qn: QuantNode, prefix: str) -> list:
    """y = sum_g (sum_{k in g} (xq - xz) * (q - z)) * w_scale[g] * x_scale, products summed exactly in int32.

    Symmetric activation codes are offset by 128 into uint8 (zero point 128) because onnxruntime's
    CPU integer GEMM is exact for uint8 x uint8; its uint8 x int8 path saturates 16-bit pair sums on
    CPUs without VNNI. Asymmetric codes are uint8 already; their per-token zero point xz enters as
    the correction xz * sum_{k in g} (q - z), subtracted in int32. Grouped weights run as one
    batched MatMulInteger over the groups."""
    x, y = qn.node.input[0], qn.node.output[0]
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{prefix}.{out}"], name=f"{prefix}.{out}", **kw)  # noqa: E731
    nodes, codes, x_scale, x_zero = activation_codes(graph, prefix, x, qn.scheme.abits, qn.scheme.act_asym)
    offset = 0 if x_zero is not None else 128
    nodes += [n("Add", [codes, graph.const(f"{prefix}.offset", np.array(offset, dtype=np.float32))], "x_offset"),
              n("Cast", [f"{prefix}.x_offset"], "x_u8", to=TensorProto.UINT8)]
    weight_codes, scales, zeros = codes_and_params(graph, qn)  # [out, in], [out, groups], [out, groups]
    (out_features, in_features), groups = weight_codes.shape, scales.shape[1]
    grouped = (groups, in_features // groups, out_features) if groups > 1 else (in_features, out_features)
    weight_nodes, weight = _weight_codes_u8(graph, prefix, weight_codes.T.reshape(grouped), qn.scheme.wbits)
    nodes += weight_nodes
    a_zero = graph.const(f"{prefix}.x_zero_point", np.array(offset, dtype=np.uint8))
    b_zero = graph.const(f"{prefix}.zero_point", zeros.T.reshape(groups, 1, out_features) if groups > 1 else zeros[:, 0])
    correction = (_zero_point_correction(graph, prefix, x_zero, weight_codes, zeros, groups)
                  if x_zero is not None else None)
    has_bias = qn.has_bias
    out = f"{prefix}.mm" if has_bias else y
    if groups == 1:
        nodes += [n("MatMulInteger", [f"{prefix}.x_u8", weight, a_zero, b_zero], "acc")]
        nodes += correction(f"{prefix}.acc", f"{prefix}.acc_exact") if correction else []
        acc = f"{prefix}.acc_exact" if correction else f"{prefix}.acc"
        nodes += [
            helper.make_node("Cast", [acc], [f"{prefix}.acc_f"], name=f"{prefix}.acc_f", to=TensorProto.FLOAT),
            n("Mul", [f"{prefix}.acc_f", x_scale], "acc_x"),
            helper.make_node("Mul", [f"{prefix}.acc_x", graph.const(f"{prefix}.weight_scale", scales[:, 0])],
                             [out], name=f"{prefix}.out"),
        ]
    else:
        nodes += _grouped_integer_gemm(graph, prefix, x, x_scale, weight, a_zero, b_zero, scales, in_features // groups, out,
                                       correction)
    if has_bias:
        nodes.append(helper.make_node("Add", [f"{prefix}.mm", qn.node.input[4]], [y], name=f"{prefix}.bias"))
    return nodes


def _weight_codes_u8(graph: Graph, prefix: str, codes: np.ndarray, wbits: int) -> tuple[list, str]:
    """Weight codes as a UINT8 tensor: 4-bit codes stay packed in the file (UINT4) and are cast."""
    if wbits > 4:
        return [], graph.const(f"{prefix}.weight_q", codes.astype(np.uint8))
    packed = graph.add_init(packed_tensor(f"{prefix}.weight_q", codes, 4, TensorProto.UINT4))
    cast = helper.make_node("Cast", [packed], [f"{prefix}.weight_u8"], name=f"{prefix}.weight_u8", to=TensorProto.UINT8)
    return [cast], f"{prefix}.weight_u8"


def _grouped_integer_gemm(graph: Graph, prefix: str, x: str, x_scale: str, weight: str, a_zero: str, b_zero: str,
                          scales: np.ndarray, group_size: int, out: str, correction=None) -> list:
    """[..., K] codes -> [groups, M, K/groups] -> MatMulInteger with [groups, K/groups, N] -> int32
    [groups, M, N] (minus the activation zero-point correction); each group times its weight
    scales, summed over groups, back to [..., N]."""
    n = lambda op, ins, o, **kw: helper.make_node(op, ins, [f"{prefix}.{o}"], name=f"{prefix}.{o}", **kw)  # noqa: E731
    out_features, groups = scales.shape
    c = lambda name, value: graph.const(f"{prefix}.{name}", np.array(value, dtype=np.int64))  # noqa: E731
    nodes = [
        n("Reshape", [f"{prefix}.x_u8", c("group_shape", [-1, groups, group_size])], "x_groups"),
        n("Transpose", [f"{prefix}.x_groups"], "x_by_group", perm=[1, 0, 2]),
        n("MatMulInteger", [f"{prefix}.x_by_group", weight, a_zero, b_zero], "acc"),
    ]
    nodes += correction(f"{prefix}.acc", f"{prefix}.acc_exact") if correction else []
    acc = f"{prefix}.acc_exact" if correction else f"{prefix}.acc"
    return nodes + [
        helper.make_node("Cast", [acc], [f"{prefix}.acc_f"], name=f"{prefix}.acc_f", to=TensorProto.FLOAT),
        n("Mul", [f"{prefix}.acc_f", graph.const(f"{prefix}.weight_scale", scales.T.reshape(groups, 1, out_features))], "acc_w"),
        n("ReduceSum", [f"{prefix}.acc_w", c("group_axis", [0])], "acc_sum", keepdims=0),
        n("Shape", [x], "x_shape"),
        n("Slice", [f"{prefix}.x_shape", c("lead_start", [0]), c("lead_end", [-1])], "lead_shape"),
        n("Concat", [f"{prefix}.lead_shape", c("out_dim", [out_features])], "out_shape", axis=0),
        n("Reshape", [f"{prefix}.acc_sum", f"{prefix}.out_shape"], "acc_shaped"),
        helper.make_node("Mul", [f"{prefix}.acc_shaped", x_scale], [out], name=f"{prefix}.out"),
    ]


def _zero_point_correction(graph: Graph, prefix: str, x_zero: str, weight_codes: np.ndarray, zeros: np.ndarray,
                           groups: int):
    """A function (acc, out) -> nodes computing out = acc - xz * colsum in int32, where colsum[g, n] =
    sum_{k in group g} (q[n, k] - z[n, g]) is a constant of the weights and xz the per-token zero
    point (rows of acc: tokens; grouped accumulators are [groups, tokens, N])."""
    out_features, in_features = weight_codes.shape
    centred = weight_codes.astype(np.int64).reshape(out_features, groups, in_features // groups) - zeros[:, :, None]
    colsum = centred.sum(axis=2).T.astype(np.int32)  # [groups, N]
    n = lambda op, ins, o, **kw: helper.make_node(op, ins, [f"{prefix}.{o}"], name=f"{prefix}.{o}", **kw)  # noqa: E731

    def nodes(acc: str, out: str) -> list:
        zero = [n("Cast", [x_zero], "x_zero_i32", to=TensorProto.INT32)]
        if groups > 1:
            rows = graph.const(f"{prefix}.zero_rows", np.array([-1, 1], dtype=np.int64))
            zero.append(n("Reshape", [f"{prefix}.x_zero_i32", rows], "x_zero_rows"))
            sums = graph.const(f"{prefix}.weight_colsum", colsum.reshape(groups, 1, out_features))
        else:
            sums = graph.const(f"{prefix}.weight_colsum", colsum[0])
        return zero + [
            n("Mul", [zero[-1].output[0], sums], "zero_correction"),
            helper.make_node("Sub", [acc, f"{prefix}.zero_correction"], [out], name=out),
        ]

    return nodes
