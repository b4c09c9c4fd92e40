"""Small FP8 and NVFP4 Q/DQ graphs in the patterns TensorRT parses (as TensorRT Model Optimizer
emits them), written with onnx helpers until lrq's own FP8/FP4 exporter exists."""

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _raw(name, data_type, array):
    return helper.make_tensor(name, data_type, list(array.shape), array.view(np.uint8).tobytes(), raw=True)


def fp8_linear(path, k=64, n=32):
    """FP8 e4m3 per-tensor activations (Q/DQ) x FP8 weights (DQ), fp16 graph."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.5).astype(ml_dtypes.float8_e4m3fn)
    inits = [
        _raw("w_fp8", TensorProto.FLOAT8E4M3FN, weight),
        numpy_helper.from_array(np.array(0.02, np.float16), "w_scale"),
        numpy_helper.from_array(np.array(0.05, np.float16), "x_scale"),
        _raw("x_zero", TensorProto.FLOAT8E4M3FN, np.zeros((), ml_dtypes.float8_e4m3fn)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_fp8", "w_scale"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    _save(path, nodes, inits, k, n, ["batch"], [helper.make_opsetid("", 21)])


def nvfp4_linear(path, k=64, n=32):
    """NVFP4: activations through trt::TRT_FP4DynamicQuantize (block 16, FP8 block scales) and
    two DQs; weights FLOAT4E2M1 with FP8 block scales and an FP32 global scale."""
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((k, n)).astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(-1) & 0xF
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    block_scales = (np.abs(rng.standard_normal((k // 16, n))) + 0.5).astype(ml_dtypes.float8_e4m3fn)
    inits = [
        helper.make_tensor("w_fp4", TensorProto.FLOAT4E2M1, [k, n], packed.tobytes(), raw=True),
        _raw("w_block_scale", TensorProto.FLOAT8E4M3FN, block_scales),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_global_scale"),
        numpy_helper.from_array(np.array(0.01, np.float32), "x_global_scale"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_block_scale", "w_global_scale"], ["w_scale"]),
        helper.make_node("DequantizeLinear", ["w_fp4", "w_scale"], ["wd32"], axis=0, block_size=16),
        helper.make_node("Cast", ["wd32"], ["wd"], to=TensorProto.FLOAT16),
        helper.make_node("TRT_FP4DynamicQuantize", ["x", "x_global_scale"], ["xq", "x_block_scale"], domain="trt",
                         axis=-1, block_size=16, scale_type=TensorProto.FLOAT8E4M3FN),
        helper.make_node("DequantizeLinear", ["x_block_scale", "x_global_scale"], ["x_scale"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale"], ["xd32"], axis=-1, block_size=16),
        helper.make_node("Cast", ["xd32"], ["xd"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    _save(path, nodes, inits, k, n, [8], [helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])


def _save(path, nodes, inits, k, n, batch, opsets):
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [*batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [*batch, n])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
