"""Lowering of float-grid linears (FP8, NVFP4, MXFP4; quant/grids.py).

- `--target ort`, standard ops onnxruntime's CPU provider runs, the reference arithmetic node by
  node: FP8 weights as FLOAT8E4M3FN initializers with a per-channel DequantizeLinear; E2M1 codes as
  UINT4 initializers turned into values by a 16-entry Gather table, times block scales (NVFP4:
  FLOAT8E4M3FN dequantized by the tensor scale; MXFP4: the powers of two as float32). Inputs: FP8
  by a saturating QuantizeLinear / DequantizeLinear pair with the layer's static scale; NVFP4 and
  MXFP4 by blocks of 16 / 32 along the last axis, block scales by the same rules as the torch
  reference, values rounded to the E2M1 grid with Round (half to even) on each binade's step.
- `--target trt`, the patterns TensorRT parses (as TensorRT Model Optimizer writes them): FP8
  Q/DQ pairs; NVFP4 weights as FLOAT4E2M1 initializers with FP8 block scales dequantized by the
  FP32 tensor scale, inputs through TensorRT's dynamic FP4 quantizer (trt::TRT_FP4DynamicQuantize,
  blocks of 16, FP8 block scales) with the static tensor scale, computed in float16. TensorRT has no
  MXFP4 input path: MXFP4 layers are refused for this target. Each layer is recorded in the
  model's metadata (FLOAT_LAYERS_KEY) so that `ort_reference` rewrites it into the onnxruntime form
  from the graph's own initializers (build-engine --verify, export verification).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrq_deploy.errors import LrqError
from lrq_deploy.export.graph import FLOAT_LAYERS_KEY, Graph, QuantNode, float_layers
from lrq_deploy.quant.floats import E2M1
from lrq_deploy.quant.grids import E8M0_BIAS
from lrq_deploy.quant.pack import pack_array, unpack_array
from lrq_deploy.quant.scheme import QuantScheme

__all__ = ["FLOAT_OPSET", "TRT_DOMAIN", "lower_float_ort", "lower_float_trt", "ort_float_layer", "ort_form_of_trt_layer"]

FLOAT_OPSET = {"ort": 21, "trt": 23}  # FLOAT8 Q/DQ and UINT4 DQ: 21; FLOAT4E2M1 initializers: 23
TRT_DOMAIN = "trt"
# The E2M1 value of each 4-bit code (sign | 2 exponent bits | 1 mantissa bit).
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


@dataclass
class FloatLayer:
    """One float-grid linear, in the graph's [in, out] weight layout."""

    prefix: str
    x: str
    y: str
    bias: str | None
    scheme: QuantScheme
    codes: np.ndarray  # uint8 [in, out], one code per element (bit patterns)
    scales: np.ndarray  # FP8: float32 [out]; NVFP4: E4M3 bit patterns [groups, out]; MXFP4: biased exponents
    tensor_scale: float
    input_scale: float

    @property
    def block(self) -> int | None:
        return self.scheme.group_size


def _layer(graph: Graph, qn: QuantNode, prefix: str) -> FloatLayer:
    """The layer from an lrq.QuantLinear node's inputs (the checkpoint's buffers, [out, in])."""
    qweight, scales, tensor_scales = (graph.array(qn.node.input[i]) for i in (1, 2, 3))
    fp8 = qn.scheme.float_format == "fp8"
    codes = qweight if fp8 else unpack_array(qweight, 4)[:, : qn.in_features].astype(np.uint8)
    if qn.scheme.quantize_activations and qn.scheme.float_format != "mxfp4" and not tensor_scales[1] > 0:
        raise LrqError(f"{qn.node.name}: the layer's input scale was never calibrated; calibrate the model again")
    return FloatLayer(prefix, qn.node.input[0], qn.node.output[0], qn.node.input[4] if qn.has_bias else None,
                      qn.scheme, np.ascontiguousarray(codes.T),
                      scales.reshape(-1).astype(np.float32) if fp8 else np.ascontiguousarray(scales.T),
                      float(tensor_scales[0]), float(tensor_scales[1]))


class _Nodes:
    """Node and constant builder for one layer (names under the layer's prefix)."""

    def __init__(self, graph: Graph, prefix: str):
        self.graph, self.prefix, self.nodes = graph, prefix, []

    def const(self, name: str, value, dtype=np.float32) -> str:
        return self.graph.const(f"{self.prefix}.{name}", np.asarray(value, dtype=dtype))

    def raw(self, name: str, data_type: int, dims, data: bytes) -> str:
        return self.graph.add_init(helper.make_tensor(f"{self.prefix}.{name}", data_type, list(dims), data, raw=True))

    def __call__(self, op: str, inputs: list[str], out: str | list[str], **attrs) -> str:
        outs = [f"{self.prefix}.{o}" for o in ([out] if isinstance(out, str) else out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs[0]


# --- onnxruntime: standard ops ---------------------------------------------------------------------

def lower_float_ort(graph: Graph, qn: QuantNode, prefix: str) -> list:
    return ort_float_layer(graph, _layer(graph, qn, prefix))


def ort_float_layer(graph: Graph, layer: FloatLayer) -> list:
    n = _Nodes(graph, layer.prefix)
    x = _ort_input(n, layer) if layer.scheme.quantize_activations else layer.x
    return _matmul(n, layer, x, _ort_weight(n, layer))


def _ort_weight(n: _Nodes, layer: FloatLayer) -> str:
    k, out = layer.codes.shape
    if layer.scheme.float_format == "fp8":
        codes = n.raw("w_fp8", TensorProto.FLOAT8E4M3FN, (k, out), layer.codes.tobytes())
        return n("DequantizeLinear", [codes, n.const("w_scale", layer.scales)], "w", axis=1)
    codes = n.raw("w_codes", TensorProto.UINT4, (k, out), pack_array(layer.codes, 4))
    as_float = n("DequantizeLinear", [codes, n.const("one", 1.0)], "w_code_f")
    index = n("Cast", [as_float], "w_code_i", to=TensorProto.INT64)
    values = n("Gather", [n.const("e2m1_table", E2M1_VALUES), index], "w_values")
    blocks = n("Reshape", [values, n.const("w_blocks_shape", [k // layer.block, layer.block, out], np.int64)],
               "w_blocks")
    if layer.scheme.float_format == "nvfp4":
        raw = n.raw("w_block_scale", TensorProto.FLOAT8E4M3FN, layer.scales.shape, layer.scales.astype(np.uint8).tobytes())
        scale = n("DequantizeLinear", [raw, n.const("w_tensor_scale", layer.tensor_scale)], "w_scale")
    else:
        scale = n.const("w_scale", np.exp2(layer.scales.astype(np.float32) - E8M0_BIAS))
    scale = n("Unsqueeze", [scale, n.const("w_scale_axis", [1], np.int64)], "w_scale_b")
    scaled = n("Mul", [blocks, scale], "w_scaled")
    return n("Reshape", [scaled, n.const("w_shape", [k, out], np.int64)], "w")


def _ort_input(n: _Nodes, layer: FloatLayer) -> str:
    fmt = layer.scheme.float_format
    if fmt == "fp8":
        scale, zero = n.const("x_scale", layer.input_scale), n.raw("x_zero", TensorProto.FLOAT8E4M3FN, (), b"\x00")
        q = n("QuantizeLinear", [layer.x, scale, zero], "xq", saturate=1)
        return n("DequantizeLinear", [q, scale], "xd")
    blocks = n("Reshape", [layer.x, n.const("x_blocks_shape", [-1, layer.block], np.int64)], "x_blocks")
    amax = n("ReduceMax", [n("Abs", [blocks], "x_abs"), n.const("last", [-1], np.int64)], "x_amax", keepdims=1)
    if fmt == "nvfp4":
        tensor = n.const("x_tensor_scale", layer.input_scale)
        per_value = n("Div", [amax, n.const("e2m1_max", E2M1.max_value)], "x_amax6")
        zero = n.raw("x_zero", TensorProto.FLOAT8E4M3FN, (), b"\x00")
        block_scale = n("QuantizeLinear", [per_value, tensor, zero], "x_block_scale", saturate=1)
        divisor = n("DequantizeLinear", [block_scale, tensor], "x_divisor")
    else:
        divisor = _power_of_two_scale(n, amax)
    values = _e2m1_round(n, blocks, divisor)
    dequantized = n("Mul", [values, divisor], "x_blocks_q")
    return n("Reshape", [dequantized, n("Shape", [layer.x], "x_shape")], "xd")


def _power_of_two_scale(n: _Nodes, amax: str) -> str:
    """MX block scale 2^(floor(log2 amax) - 2), 1 for a zero block: floor(log2) from Log, corrected
    by one step either way so it is exact where Log rounds across a power of two."""
    positive = n("Greater", [amax, n.const("x_amax_floor", 0.0)], "x_nonzero")
    safe = n("Where", [positive, amax, n.const("x_amax_unit", 1.0)], "x_safe")
    two = n.const("two", 2.0)
    guess = n("Floor", [n("Div", [n("Log", [safe], "x_ln"), n.const("ln2", np.log(2.0))], "x_log2")], "x_e0")
    too_big = n("Cast", [n("Greater", [n("Pow", [two, guess], "x_p0"), safe], "x_over")], "x_over_f",
                to=TensorProto.FLOAT)
    lower = n("Sub", [guess, too_big], "x_e1")
    next_power = n("Mul", [n("Pow", [two, lower], "x_p1"), two], "x_p1x2")
    too_small = n("Cast", [n("LessOrEqual", [next_power, safe], "x_under")], "x_under_f", to=TensorProto.FLOAT)
    exponent = n("Sub", [n("Add", [lower, too_small], "x_e2"), n.const("e2m1_emax", 2.0)], "x_exponent")
    scale = n("Pow", [two, exponent], "x_pow")
    return n("Where", [positive, scale, n.const("unit", 1.0)], "x_divisor")


def _e2m1_round(n: _Nodes, blocks: str, divisor: str) -> str:
    """E2M1 values of blocks / divisor (0 where the divisor is 0): steps 0.5 below 2, 1 below 4, 2
    above, Round half to even, saturating at 6, the sign put back."""
    positive = n("Greater", [divisor, n.const("zero_d", 0.0)], "x_div_pos")
    safe = n("Where", [positive, divisor, n.const("one_d", 1.0)], "x_div_safe")
    scaled = n("Where", [positive, n("Div", [blocks, safe], "x_scaled_raw"), n.const("zero_v", 0.0)], "x_scaled")
    a = n("Abs", [scaled], "x_scaled_abs")
    step = n("Where", [n("Less", [a, n.const("two_v", 2.0)], "x_lt2"), n.const("half", 0.5),
                       n("Where", [n("Less", [a, n.const("four_v", 4.0)], "x_lt4"), n.const("unit_v", 1.0),
                                   n.const("two_s", 2.0)], "x_step_hi")], "x_step")
    rounded = n("Mul", [n("Round", [n("Div", [a, step], "x_steps")], "x_steps_r"), step], "x_rounded")
    clipped = n("Min", [rounded, n.const("e2m1_top", E2M1.max_value)], "x_clipped")
    negative = n("Less", [scaled, n.const("zero_s", 0.0)], "x_neg")
    return n("Where", [negative, n("Neg", [clipped], "x_negated"), clipped], "x_values")


# --- TensorRT: Q/DQ patterns ---------------------------------------------------------------------------

def check_float_target(scheme, target: str) -> None:
    """Refuse what a target cannot run, known from the scheme before anything is traced."""
    if target == "trt" and scheme is not None and scheme.float_format == "mxfp4":
        raise LrqError("TensorRT has no MXFP4 path (its FP4 is NVFP4): export MXFP4 checkpoints with --target ort, "
                       "or calibrate with --scheme nvfp4")


def lower_float_trt(graph: Graph, qn: QuantNode, prefix: str) -> list:
    layer = _layer(graph, qn, prefix)
    check_float_target(layer.scheme, "trt")
    _record(graph.model, layer)
    if layer.scheme.quantize_activations and layer.scheme.float_format == "nvfp4" and not any(
            o.domain == TRT_DOMAIN for o in graph.model.opset_import):
        graph.model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    # FP8 Q/DQ is one form for both runtimes
    return (ort_float_layer if layer.scheme.float_format == "fp8" else _trt_nvfp4)(graph, layer)


def _trt_nvfp4(graph: Graph, layer: FloatLayer) -> list:
    n = _Nodes(graph, layer.prefix)
    k, out = layer.codes.shape
    x = n("Cast", [layer.x], "x16", to=TensorProto.FLOAT16)
    if layer.scheme.quantize_activations:
        tensor = n.const("x_tensor_scale", layer.input_scale)
        xq = n("TRT_FP4DynamicQuantize", [x, tensor], ["xq", "x_block_scale"], domain=TRT_DOMAIN,
               axis=-1, block_size=layer.block, scale_type=TensorProto.FLOAT8E4M3FN)
        block_scale = f"{layer.prefix}.x_block_scale"
        x_scale = n("DequantizeLinear", [block_scale, tensor], "x_scale")
        x = n("Cast", [n("DequantizeLinear", [xq, x_scale], "xd32", axis=-1, block_size=layer.block)], "xd",
              to=TensorProto.FLOAT16)
    codes = n.raw("w_fp4", TensorProto.FLOAT4E2M1, (k, out), pack_array(layer.codes, 4))
    raw = n.raw("w_block_scale", TensorProto.FLOAT8E4M3FN, layer.scales.shape, layer.scales.astype(np.uint8).tobytes())
    w_scale = n("DequantizeLinear", [raw, n.const("w_tensor_scale", layer.tensor_scale)], "w_scale")
    weight = n("Cast", [n("DequantizeLinear", [codes, w_scale], "w32", axis=0, block_size=layer.block)], "w16",
               to=TensorProto.FLOAT16)
    return _output(n, layer, n("Cast", [n("MatMul", [x, weight], "mm16")], "mm", to=TensorProto.FLOAT))


def _matmul(n: _Nodes, layer: FloatLayer, x: str, weight: str) -> list:
    return _output(n, layer, n("MatMul", [x, weight], "mm"))


def _output(n: _Nodes, layer: FloatLayer, product: str) -> list:
    """The layer's nodes, the last writing its output (plus the bias where it has one)."""
    if layer.bias:
        n("Add", [product, layer.bias], "out")
    else:
        n("Identity", [product], "out")
    n.nodes[-1].output[0] = layer.y
    return n.nodes


# --- the way back: a TensorRT float layer as onnxruntime runs it ------------------------------------------

def _record(model: onnx.ModelProto, layer: FloatLayer) -> None:
    entry = {"prefix": layer.prefix, "x": layer.x, "y": layer.y, "bias": layer.bias,
             "scheme": layer.scheme.to_dict(), "input_scale": layer.input_scale}
    layers = json.dumps(float_layers(model) + [entry])
    prop = next((p for p in model.metadata_props if p.key == FLOAT_LAYERS_KEY), None)
    if prop is None:
        prop = model.metadata_props.add()
        prop.key = FLOAT_LAYERS_KEY
    prop.value = layers


def ort_form_of_trt_layer(graph: Graph, entry: dict) -> list:
    """The onnxruntime nodes of a TensorRT float layer, from the graph's own initializers."""
    prefix, scheme = entry["prefix"], QuantScheme.from_dict(entry["scheme"])
    array = lambda name: numpy_helper.to_array(graph.inits[f"{prefix}.{name}"])  # noqa: E731
    if scheme.float_format == "fp8":
        codes_tensor = graph.inits[f"{prefix}.w_fp8"]
        k, out = codes_tensor.dims
        codes = np.frombuffer(codes_tensor.raw_data, np.uint8).reshape(k, out)
        scales, tensor_scale = array("w_scale").astype(np.float32), 1.0
    else:
        codes_tensor = graph.inits[f"{prefix}.w_fp4"]
        k, out = codes_tensor.dims
        codes = unpack_array(codes_tensor.raw_data, 4, count=k * out).reshape(k, out).astype(np.uint8)
        block = graph.inits[f"{prefix}.w_block_scale"]
        scales = np.frombuffer(block.raw_data, np.uint8).reshape(tuple(block.dims))
        tensor_scale = float(array("w_tensor_scale"))
    layer = FloatLayer(f"{prefix}.ort", entry["x"], entry["y"], entry["bias"], scheme, codes, scales, tensor_scale,
                       entry["input_scale"])
    return ort_float_layer(graph, layer)
