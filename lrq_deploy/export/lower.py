"""Lowering of lrq.QuantLinear nodes: standard ONNX ops (target ort) or TensorRT nodes (target trt).

Weights enter the graph as [in, out] so that MatMul consumes the dequantized tensor directly:
codes are re-laid out once, at export. ONNX packs 4-bit and 2-bit tensors little end first
over the flattened tensor, the same order as the checkpoint (docs/FORMATS.md).

target ort, per linear:
    weight-only: MatMul(x, DequantizeLinear(W[in, out] as UINT4/UINT2/UINT8, scale[groups, out], zero,
      axis=0, block_size)) (+ Add bias)
    activations quantized (W4A4, W6A6, W8A8, per channel or grouped): integer arithmetic, exact at
      every onnxruntime optimization level: per-token codes (Abs, ReduceMax, Max, Div, Div, Round, Clip)
      offset to uint8, MatMulInteger against the weight codes (UINT4 cast to UINT8, or UINT8) and their
      zero points (batched over groups for grouped weights), then Cast and the scales (+ Add bias)
    2-bit weights with quantized activations: the codes scaled back to float (Mul), then as weight-only
target trt:
    symmetric INT4 weight-only -> TensorRT's native path: INT4 initializer, zero-free block DequantizeLinear
    everything else -> one node in the `lrq` domain named after its plugin (W4A4Linear, W2A16Linear, ...)
    with the checkpoint's packed weights and uint8 zero points (both stored as INT8 bytes) and
    float16 scales as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrq_deploy.errors import LrqError
from lrq_deploy.export.ops import DOMAIN
from lrq_deploy.quant.scheme import KernelFamily, QuantScheme, group_from_attr

PLUGIN_NAMESPACE = "lrq"
# Minimum opset of a DequantizeLinear per weight type (block-wise DQ and INT4/UINT4: 21, INT2/UINT2: 25).
MIN_OPSET = {2: 25, 3: 21, 4: 21, 6: 21, 8: 21, 16: 18}
_ONNX_TYPE = {2: TensorProto.UINT2, 3: TensorProto.UINT4, 4: TensorProto.UINT4, 6: TensorProto.UINT8, 8: TensorProto.UINT8}


@dataclass
class LinearNode:
    node: onnx.NodeProto
    wbits: int
    abits: int
    group_size: int
    in_features: int
    act_asym: int = 0

    @classmethod
    def from_attrs(cls, node: onnx.NodeProto, attrs: dict) -> "LinearNode":
        return cls(node, attrs["wbits"], attrs["abits"], attrs["group_size"], attrs["in_features"], attrs.get("act_asym", 0))

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.wbits, self.abits, group_from_attr(self.group_size), act_asym=bool(self.act_asym))

    @property
    def plugin_name(self) -> str:
        return self.scheme.plugin_name


def _as_linear(node: onnx.NodeProto) -> LinearNode | None:
    if node.domain != DOMAIN or node.op_type != "QuantLinear":
        return None
    return LinearNode.from_attrs(node, {a.name: helper.get_attribute_value(a) for a in node.attribute})


def quant_linear_nodes(model: onnx.ModelProto) -> list[LinearNode]:
    return [ln for ln in map(_as_linear, model.graph.node) if ln is not None]


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


def required_opset(model: onnx.ModelProto, target: str) -> int:
    needed = 18
    for ln in quant_linear_nodes(model):
        if target == "ort" or _is_native_int4(ln, model):
            needed = max(needed, MIN_OPSET[ln.wbits])
    return needed


def pack_flat(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes over the flattened tensor, little end first (ONNX's order)."""
    width = {2: 2, 3: 4, 4: 4}.get(bits, 8)
    flat = (codes.astype(np.int16).reshape(-1) & (2**width - 1)).astype(np.uint8)  # two's complement for signed
    per_byte = 8 // width
    if per_byte == 1:
        return flat.tobytes()
    flat = np.concatenate([flat, np.zeros((-flat.size) % per_byte, np.uint8)])
    parts = flat.reshape(-1, per_byte).astype(np.uint32) << (np.arange(per_byte, dtype=np.uint32) * width)
    return parts.sum(axis=1).astype(np.uint8).tobytes()


def unpack_flat(raw: bytes, bits: int, count: int, signed: bool = False) -> np.ndarray:
    width = {2: 2, 3: 4, 4: 4}.get(bits, 8)
    data = np.frombuffer(raw, dtype=np.uint8)
    per_byte = 8 // width
    if per_byte == 1:
        values = data.astype(np.int16)
    else:
        values = ((data[:, None] >> (np.arange(per_byte, dtype=np.uint8) * width)) & (2**width - 1)).reshape(-1)
        values = values.astype(np.int16)
    values = values[:count]
    if signed:
        values = np.where(values >= 2 ** (width - 1), values - 2**width, values)
    return values


def _packed_tensor(name: str, codes: np.ndarray, bits: int, data_type: int) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(codes.shape)
    tensor.raw_data = pack_flat(codes, bits)
    return tensor


class _Graph:
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


def _codes_and_params(graph: _Graph, ln: LinearNode):
    """(codes [out, in] int, scales [out, groups] float32, zeros [out, groups] int) from the node's inputs."""
    from lrq_deploy.quant.pack import container_bits

    packed = graph.array(ln.node.input[1])
    width = container_bits(ln.wbits)
    per_byte = 8 // width
    parts = (packed[..., None] >> (np.arange(per_byte, dtype=np.uint8) * width)) & (2**width - 1)
    codes = parts.reshape(packed.shape[0], -1)[:, : ln.in_features]
    return codes, graph.array(ln.node.input[2]).astype(np.float32), graph.array(ln.node.input[3])


def _is_native_int4(ln: LinearNode, model: onnx.ModelProto) -> bool:
    if not (ln.wbits == 4 and ln.abits == 16):
        return False
    zeros = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == ln.node.input[3]))
    return bool(np.all(zeros == 8))


def _activation_codes(graph: _Graph, prefix: str, x: str, bits: int, asym: bool = False) -> tuple[list, str, str, str | None]:
    """Per-token quantization, the reference arithmetic in standard ops: (nodes, codes as float
    integers, scale [..., 1], zero point [..., 1] or None). Symmetric codes lie in [-qmax, qmax];
    asymmetric ones in [0, 2^b - 1] with the zero point round(-min(x, 0) / scale)."""
    c = lambda n, v: graph.const(f"{prefix}.{n}", np.array(v, dtype=np.float32))  # noqa: E731
    axes = graph.const(f"{prefix}.axes", np.array([-1], dtype=np.int64))
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{prefix}.{out}"], name=f"{prefix}.{out}", **kw)  # noqa: E731
    if not asym:
        qmax = float(2 ** (bits - 1) - 1)
        nodes = [
            n("Abs", [x], "abs"),
            n("ReduceMax", [f"{prefix}.abs", axes], "amax", keepdims=1),
            n("Max", [f"{prefix}.amax", c("eps", 1e-5)], "amax_clamped"),
            n("Div", [f"{prefix}.amax_clamped", c("qmax", qmax)], "scale"),
            n("Div", [x, f"{prefix}.scale"], "scaled"),
            n("Round", [f"{prefix}.scaled"], "rounded"),
            n("Clip", [f"{prefix}.rounded", c("lo", -qmax), c("hi", qmax)], "q"),
        ]
        return nodes, f"{prefix}.q", f"{prefix}.scale", None
    levels = float(2**bits - 1)
    nodes = [
        n("ReduceMax", [x, axes], "xmax", keepdims=1),
        n("Max", [f"{prefix}.xmax", c("zero_f", 0.0)], "hi"),
        n("ReduceMin", [x, axes], "xmin", keepdims=1),
        n("Min", [f"{prefix}.xmin", f"{prefix}.zero_f"], "lo"),
        n("Sub", [f"{prefix}.hi", f"{prefix}.lo"], "range"),
        n("Max", [f"{prefix}.range", c("eps", 1e-5)], "range_clamped"),
        n("Div", [f"{prefix}.range_clamped", c("levels", levels)], "scale"),
        n("Neg", [f"{prefix}.lo"], "neg_lo"),
        n("Div", [f"{prefix}.neg_lo", f"{prefix}.scale"], "zero_scaled"),
        n("Round", [f"{prefix}.zero_scaled"], "zero"),
        n("Div", [x, f"{prefix}.scale"], "scaled"),
        n("Round", [f"{prefix}.scaled"], "rounded"),
        n("Add", [f"{prefix}.rounded", f"{prefix}.zero"], "shifted"),
        n("Clip", [f"{prefix}.shifted", f"{prefix}.zero_f", c("levels_hi", levels)], "q"),
    ]
    return nodes, f"{prefix}.q", f"{prefix}.scale", f"{prefix}.zero"


def _activation_quant(graph: _Graph, prefix: str, x: str, bits: int, asym: bool = False) -> tuple[list, str]:
    """Per-token fake quantization: the codes scaled back to float ((q - z) * s when asymmetric)."""
    nodes, codes, scale, zero = _activation_codes(graph, prefix, x, bits, asym)
    if zero is not None:
        nodes.append(helper.make_node("Sub", [codes, zero], [f"{prefix}.centred"], name=f"{prefix}.centred"))
        codes = f"{prefix}.centred"
    nodes.append(helper.make_node("Mul", [codes, scale], [f"{prefix}.xq"], name=f"{prefix}.xq"))
    return nodes, f"{prefix}.xq"


def _integer_eligible(ln: LinearNode) -> bool:
    """Layers the integer kernels serve run as integer GEMMs here too (activation-quantized,
    weight codes that fit a byte)."""
    return ln.scheme.kernel is KernelFamily.INTEGER


def _lower_integer(graph: _Graph, ln: LinearNode, prefix: str) -> list:
    """y = sum_g (sum_{k in g} (xq - xz) * (q - z)) * w_scale[g] * x_scale, products summed exactly in int32.

    Symmetric activation codes are offset by 128 into uint8 (zero point 128) because onnxruntime's
    CPU integer GEMM is exact for uint8 x uint8; its uint8 x int8 path saturates 16-bit pair sums on
    CPUs without VNNI. Asymmetric codes are uint8 already; their per-token zero point xz enters as
    the correction xz * sum_{k in g} (q - z), subtracted in int32. Grouped weights run as one
    batched MatMulInteger over the groups."""
    x, y = ln.node.input[0], ln.node.output[0]
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{prefix}.{out}"], name=f"{prefix}.{out}", **kw)  # noqa: E731
    nodes, codes, x_scale, x_zero = _activation_codes(graph, prefix, x, ln.abits, bool(ln.act_asym))
    offset = 0 if x_zero is not None else 128
    nodes += [n("Add", [codes, graph.const(f"{prefix}.offset", np.array(offset, dtype=np.float32))], "x_offset"),
              n("Cast", [f"{prefix}.x_offset"], "x_u8", to=TensorProto.UINT8)]
    weight_codes, scales, zeros = _codes_and_params(graph, ln)  # [out, in], [out, groups], [out, groups]
    (out_features, in_features), groups = weight_codes.shape, scales.shape[1]
    grouped = (groups, in_features // groups, out_features) if groups > 1 else (in_features, out_features)
    weight_nodes, weight = _weight_codes_u8(graph, prefix, weight_codes.T.reshape(grouped), ln.wbits)
    nodes += weight_nodes
    a_zero = graph.const(f"{prefix}.x_zero_point", np.array(offset, dtype=np.uint8))
    b_zero = graph.const(f"{prefix}.zero_point", zeros.T.reshape(groups, 1, out_features) if groups > 1 else zeros[:, 0])
    correction = (_zero_point_correction(graph, prefix, x_zero, weight_codes, zeros, groups)
                  if x_zero is not None else None)
    has_bias = len(ln.node.input) > 4 and ln.node.input[4]
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
        nodes.append(helper.make_node("Add", [f"{prefix}.mm", ln.node.input[4]], [y], name=f"{prefix}.bias"))
    return nodes


def _weight_codes_u8(graph: _Graph, prefix: str, codes: np.ndarray, wbits: int) -> tuple[list, str]:
    """Weight codes as a UINT8 tensor: 4-bit codes stay packed in the file (UINT4) and are cast."""
    if wbits > 4:
        return [], graph.const(f"{prefix}.weight_q", codes.astype(np.uint8))
    packed = graph.add_init(_packed_tensor(f"{prefix}.weight_q", codes, 4, TensorProto.UINT4))
    cast = helper.make_node("Cast", [packed], [f"{prefix}.weight_u8"], name=f"{prefix}.weight_u8", to=TensorProto.UINT8)
    return [cast], f"{prefix}.weight_u8"


def _grouped_integer_gemm(graph: _Graph, prefix: str, x: str, x_scale: str, weight: str, a_zero: str, b_zero: str,
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


def _zero_point_correction(graph: _Graph, prefix: str, x_zero: str, weight_codes: np.ndarray, zeros: np.ndarray,
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


def _dequantized_weight(graph: _Graph, ln: LinearNode, prefix: str, signed_int4: bool) -> tuple[list, str]:
    codes, scales, zeros = _codes_and_params(graph, ln)
    codes_t, scales_t, zeros_t = codes.T, scales.T, zeros.T  # [in, out], [groups, out]
    group = ln.scheme.group_length(ln.in_features)
    inputs = []
    if signed_int4:
        w = _packed_tensor(f"{prefix}.weight_int4", codes_t.astype(np.int16) - 8, 4, TensorProto.INT4)
        inputs = [graph.add_init(w), graph.const(f"{prefix}.weight_scale", scales_t)]
    else:
        data_type = _ONNX_TYPE[ln.wbits]
        w = _packed_tensor(f"{prefix}.weight_q", codes_t, ln.wbits, data_type)
        z = _packed_tensor(f"{prefix}.zero_point", zeros_t, ln.wbits, data_type)
        inputs = [graph.add_init(w), graph.const(f"{prefix}.weight_scale", scales_t), graph.add_init(z)]
    node = helper.make_node(
        "DequantizeLinear", inputs, [f"{prefix}.weight"], name=f"{prefix}.dq", axis=0, block_size=group
    )
    return [node], f"{prefix}.weight"


def _lower_standard(graph: _Graph, ln: LinearNode, prefix: str, signed_int4: bool = False) -> list:
    x, y = ln.node.input[0], ln.node.output[0]
    nodes = []
    if ln.abits < 16:
        act_nodes, x = _activation_quant(graph, prefix, x, ln.abits, bool(ln.act_asym))
        nodes += act_nodes
    if ln.wbits < 16:
        weight_nodes, weight = _dequantized_weight(graph, ln, prefix, signed_int4)
        nodes += weight_nodes
    else:
        weight = graph.const(f"{prefix}.weight_t", graph.array(ln.node.input[1]).T.copy())
    has_bias = len(ln.node.input) > 4 and ln.node.input[4]
    nodes.append(helper.make_node("MatMul", [x, weight], [f"{prefix}.mm" if has_bias else y], name=f"{prefix}.matmul"))
    if has_bias:
        nodes.append(helper.make_node("Add", [f"{prefix}.mm", ln.node.input[4]], [y], name=f"{prefix}.bias"))
    return nodes


def _lower_for_ort(graph: _Graph, ln: LinearNode, prefix: str) -> list:
    return _lower_integer(graph, ln, prefix) if _integer_eligible(ln) else _lower_standard(graph, ln, prefix)


def _as_int8_bytes(graph: _Graph, name: str, prefix: str) -> str:
    """The same bytes as an INT8 initializer: TensorRT's ONNX parser widens UINT8 initializers
    to INT32, which would quadruple the packed weights; the plugin reads the bytes back as uint8."""
    array = graph.array(name)
    return graph.add_init(numpy_helper.from_array(array.view(np.int8), f"{prefix}.{name.rsplit('.', 1)[-1]}_bytes"))


def _plugin_node(graph: _Graph, ln: LinearNode, prefix: str, out_features: int, symmetric: bool) -> list:
    inputs = list(ln.node.input)
    inputs[1], inputs[3] = _as_int8_bytes(graph, inputs[1], prefix), _as_int8_bytes(graph, inputs[3], prefix)
    node = helper.make_node(
        ln.plugin_name, inputs, list(ln.node.output), name=prefix, domain=DOMAIN,
        wbits=ln.wbits, abits=ln.abits, group_size=ln.group_size, in_features=ln.in_features, act_asym=int(ln.act_asym),
        out_features=out_features, symmetric=int(symmetric), plugin_namespace=PLUGIN_NAMESPACE, aot=1,
    )
    return [node]


def lower(model: onnx.ModelProto, target: str, symmetric: bool) -> onnx.ModelProto:
    """Replace every lrq.QuantLinear node in place; returns the model."""
    graph = _Graph(model)
    new_nodes, index = [], 0
    for node in list(model.graph.node):
        ln = _as_linear(node)
        if ln is None:
            new_nodes.append(node)
            continue
        prefix = f"lrq_linear_{index}"
        index += 1
        if target == "ort":
            new_nodes += _lower_for_ort(graph, ln, prefix)
        elif _is_native_int4(ln, model):
            new_nodes += _lower_standard(graph, ln, prefix, signed_int4=True)
        else:
            new_nodes += _plugin_node(graph, ln, prefix, graph.array(ln.node.input[1]).shape[0], symmetric)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    graph.drop_unused_initializers()
    if target == "ort":
        _drop_domain(model, DOMAIN)
    return model


def ort_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A `--target trt` graph made runnable by onnxruntime: each lrq plugin node becomes the
    standard ops `--target ort` writes, from the node's own bytes. TensorRT engines are
    checked against it (build-engine --verify). Native INT4 nodes are standard already."""
    graph = _Graph(model)
    new_nodes, opset = [], default_opset(model)
    for index, node in enumerate(model.graph.node):
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        opset = max(opset, MIN_OPSET[attrs["wbits"]])
        inputs = list(node.input)
        for i in (1, 3):  # uint8 bytes carried as INT8
            inputs[i] = graph.const(f"lrq_reference_{index}.{i}", graph.array(inputs[i]).view(np.uint8))
        ln_node = helper.make_node("QuantLinear", inputs, list(node.output), domain=DOMAIN)
        ln = LinearNode.from_attrs(ln_node, attrs)
        new_nodes += _lower_for_ort(graph, ln, f"lrq_reference_{index}")
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    graph.drop_unused_initializers()
    _drop_domain(model, DOMAIN)
    set_opset(model, opset)
    return model


def _drop_domain(model: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)
