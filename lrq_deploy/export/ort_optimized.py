"""Graphs as onnxruntime runs them: its extended-level optimization saved by onnxruntime itself
(DequantizeLinear + MatMul pairs become MatMulNBits nodes at the accuracy level lrq verified),
and, with --cpu-kernels, every MatMulNBits node lrq's CPU kernel serves rewritten into
ai.lrq.cpu::MatMulInt4 (runtime/cpu_kernels.py): the same weights, scales, zero points and
numerics (4-bit codes, block-wise fp32 scales; fp32 activations, or with --ort-int8-activations
activations rounded to int8 per block), a faster GEMM."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lrq_deploy.progress import step
from lrq_deploy.runtime.onnxrt import INT8_ACTIVATIONS_LEVEL, MATMULNBITS_ACCURACY_KEY

CPU_KERNELS_META = "lrq.cpu_kernels"
MATMULNBITS_INPUTS = ("A", "B", "scales", "zero_points", "g_idx", "bias")
BLOCK_MULTIPLE = 32  # lrq's CPU kernel takes blocks of a multiple of 32 (of 128 with int8 activations)
INT8_BLOCK_MULTIPLE = 128


def save_optimized(graph: Path, accuracy_level: str) -> None:
    """Replace `graph` by onnxruntime's extended-level optimization of it (MatMulNBits nodes at
    `accuracy_level`), saved by onnxruntime itself; external weights stay external."""
    import onnxruntime as ort

    from lrq_deploy.runtime import cpu_kernels

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    optimized = graph.with_name(graph.name + ".optimized")
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, accuracy_level)
    if cpu_kernels.needs_library(graph):  # attention over a quantized cache is the library's op from the trace on
        cpu_kernels.register(options)
    data = graph.with_name(graph.name + ".data")
    if data.is_file():  # weights past protobuf's 2 GiB limit: keep them in one file beside the graph
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized.name + ".data")
    with step("optimizing the graph as onnxruntime runs it (extended level)"):
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    if data.is_file():
        _rename_external_data(optimized, optimized.name + ".data", data.name)
        os.replace(optimized.with_name(optimized.name + ".data"), data)
    os.replace(optimized, graph)


def _rename_external_data(graph: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(model, str(graph))


def use_cpu_kernels(graph: Path) -> int:
    """Rewrite the MatMulNBits nodes of the saved graph at `graph` that lrq's CPU kernel serves
    into ai.lrq.cpu::MatMulInt4 (in place; weights are not read); returns how many."""
    import onnx
    from onnx import helper

    from lrq_deploy.runtime.cpu_kernels import DOMAIN

    model = onnx.load(str(graph), load_external_data=False)
    shapes = {t.name: (tuple(t.dims), t.data_type) for t in model.graph.initializer}
    nodes = [_as_lrq_kernel(node, shapes) or node for node in model.graph.node]
    swapped = sum(n.domain == DOMAIN for n in nodes)
    if swapped:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        model.metadata_props.add(key=CPU_KERNELS_META, value=DOMAIN)
        onnx.save(model, str(graph))
    return swapped


def _as_lrq_kernel(node, shapes: dict):
    """The MatMulInt4 node for a MatMulNBits node the kernel serves, else None: 4-bit codes,
    4-bit zero points or none (8), no g_idx, fp32 activations (accuracy level 0 or 1) or int8
    activations (level 4, blocks a multiple of 128), blocks a multiple of 32 dividing K; weights,
    scales and zero points as initializers. The accuracy level carries over."""
    from onnx import TensorProto, helper

    from lrq_deploy.runtime.cpu_kernels import DOMAIN, OP

    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = dict(zip(MATMULNBITS_INPUTS, node.input))
    K, N, block = attrs.get("K"), attrs.get("N"), attrs.get("block_size")
    level = max(1, attrs.get("accuracy_level", 0))
    if attrs.get("bits", 4) != 4 or not K or not N or not block or level not in (1, 4):
        return None
    if level == 4 and block % INT8_BLOCK_MULTIPLE:
        return None  # int8 activations: lrq's kernel takes blocks of a multiple of 128; MatMulNBits keeps the rest
    if inputs.get("g_idx") or block % BLOCK_MULTIPLE or K % block:
        return None
    codes, scales = shapes.get(inputs["B"]), shapes.get(inputs["scales"])
    if codes != ((N, K // block, block // 2), TensorProto.UINT8) or scales is None or scales[1] != TensorProto.FLOAT:
        return None
    zeros = inputs.get("zero_points", "")
    if zeros:
        dims, dtype = shapes.get(zeros, ((), None))
        if dtype != TensorProto.UINT8 or math.prod(dims) != N * ((K // block + 1) // 2):
            return None
    bias = [inputs["bias"]] if inputs.get("bias") else []
    optional = [zeros, *bias] if zeros or bias else []
    return helper.make_node(OP, [inputs["A"], inputs["B"], inputs["scales"], *optional], list(node.output),
                            name=node.name, domain=DOMAIN, K=K, N=N, block_size=block, accuracy_level=level)


def as_onnxruntime_runs(graph: Path, report: dict, options) -> None:
    """The finishing step (export_loaded's `finish`) of a --genai or --cpu-kernels export: the
    saved optimization at the accuracy level the ExportOptions `options` declare, then lrq's CPU
    kernels where asked; refused when none of the graph's linears fits them."""
    from lrq_deploy.errors import LrqError

    save_optimized(graph, INT8_ACTIVATIONS_LEVEL if options.ort_int8_activations else "1")
    if options.cpu_kernels:
        from lrq_deploy.runtime.cpu_kernels import code_path

        report["cpu_kernel_linears"] = use_cpu_kernels(graph)
        report["cpu_kernel_code"] = code_path()
        if not report["cpu_kernel_linears"]:
            raise LrqError("--cpu-kernels: no linear of this graph fits lrq's CPU kernel (4-bit weights in blocks "
                           "of a multiple of 32; of 128 with --ort-int8-activations)")
