"""Float-grid linears exported: the onnxruntime form (standard ops) reproduces the torch reference
bit for bit on the quantized values, the TensorRT form holds the same codes (FLOAT8E4M3FN /
FLOAT4E2M1 initializers) and turns back into the onnxruntime form from its own bytes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.errors import LrqError
from lrq_deploy.export import export_onnx
from lrq_deploy.export.graph import Graph, QuantNode, float_layers
from lrq_deploy.export.lower_float import E2M1_VALUES, lower_float_ort, lower_float_trt
from lrq_deploy.export.lower_trt import ort_reference
from lrq_deploy.quant import QuantLinear, floats
from lrq_deploy.quant.grids import input_scale_of, weight_grid
from lrq_deploy.quant.scheme import PRESETS, QuantScheme

K, N, TOKENS = 128, 48, 96


def _layer(preset: str, bias: bool = False) -> tuple[QuantLinear, torch.Tensor]:
    """A layer with hard cases: a zero weight block, rows of very different magnitude, inputs with
    a zero block, outliers beyond the calibrated input range (saturation) and tiny blocks."""
    scheme = QuantScheme.preset(preset)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * torch.logspace(-3, 1, N).unsqueeze(1)
    w[5, :32] = 0
    x = torch.randn(2, TOKENS // 2, K, generator=gen) * torch.logspace(-4, 1, K)
    x[0, 3, :32] = 0
    grid = weight_grid(scheme)
    b = torch.randn(N, generator=gen) if bias else None
    layer = QuantLinear.from_stored(grid.stored(w, grid.qparams(w)), K, b, scheme)
    if scheme.quantize_activations:
        layer.tensor_scales[1] = input_scale_of(x.abs().amax() * 0.5, scheme)  # the top half saturates
    return layer, x


def _node_graph(layer: QuantLinear, lower, prefix="l0") -> onnx.ModelProto:
    qweight, scales, third = layer.weight_tensors()
    tensors = [(qweight, "qw"), (scales, "sc"), (third, "th")] + ([(layer.bias, "b")] if layer.bias is not None else [])
    inits = [numpy_helper.from_array(t.numpy(), name) for t, name in tensors]
    node = helper.make_node("QuantLinear", ["x"] + [name for _, name in tensors], ["y"], domain="lrq", name="ql")
    model = helper.make_model(helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, N])], inits),
        opset_imports=[helper.make_opsetid("", 23)])
    graph = Graph(model)
    nodes = lower(graph, QuantNode(node, layer.config, K), prefix)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    graph.drop_unused_initializers()
    return model


def _run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def _reference_parts(layer: QuantLinear, x: torch.Tensor):
    """The quantized input and dequantized weight the torch reference multiplies."""
    from lrq_deploy.quant.grids import fake_quant_input

    return fake_quant_input(x, layer.config, layer.input_scale), layer.dequantized_weight()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_ort_form_is_the_reference_bit_for_bit(preset):
    layer, x = _layer(preset, bias=True)
    xq, weight = _reference_parts(layer, x)
    model = _node_graph(layer, lower_float_ort)
    onnx.checker.check_model(model, full_check=True)
    # the quantized values themselves: the graph's dequantized weight and quantized input
    outputs = {n.output[0]: n for n in model.graph.node}
    probes = ["l0.w"] + (["l0.xd"] if layer.config.quantize_activations else [])
    model.graph.output.extend(helper.make_tensor_value_info(p, TensorProto.FLOAT, None) for p in probes if p in outputs)
    results = dict(zip([o.name for o in model.graph.output], _run_all(model, x)))
    assert np.array_equal(results["l0.w"], weight.T.numpy())
    if layer.config.quantize_activations:
        assert np.array_equal(results["l0.xd"], xq.numpy())
    # the product: float32 sums in another order than torch's, nothing else
    np.testing.assert_allclose(results["y"], layer(x).detach().numpy(), rtol=1e-5, atol=1e-5 * float(layer(x).abs().max()))


def _run_all(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})


def test_e2m1_table_is_the_format():
    assert np.array_equal(E2M1_VALUES, floats.decode(torch.arange(16), floats.E2M1).numpy())


@pytest.mark.parametrize("preset", ["fp8", "nvfp4", "w8a16-fp8", "w4a16-nvfp4"])
def test_trt_form_holds_the_codes_and_comes_back_exactly(preset):
    layer, x = _layer(preset)
    model = _node_graph(layer, lower_float_trt)
    inits = {t.name: t for t in model.graph.initializer}
    if layer.config.float_format == "fp8":
        weight = inits["l0.w_fp8"]
        assert weight.data_type == TensorProto.FLOAT8E4M3FN
        assert np.array_equal(np.frombuffer(weight.raw_data, np.uint8).reshape(K, N), layer.qweight.numpy().T)
    else:
        weight, scales = inits["l0.w_fp4"], inits["l0.w_block_scale"]
        assert weight.data_type == TensorProto.FLOAT4E2M1 and list(weight.dims) == [K, N]
        assert scales.data_type == TensorProto.FLOAT8E4M3FN
        assert np.array_equal(np.frombuffer(scales.raw_data, np.uint8).reshape(K // 16, N), layer.scales.numpy().T)
        if layer.config.quantize_activations:
            quantizer = next(n for n in model.graph.node if n.op_type == "TRT_FP4DynamicQuantize")
            assert quantizer.domain == "trt" and {a.name: a.i for a in quantizer.attribute}["block_size"] == 16
    assert [entry["prefix"] for entry in float_layers(model)] == ["l0"]
    back = ort_reference(model)
    assert not any(n.domain == "trt" for n in back.graph.node)
    np.testing.assert_array_equal(_run(back, x), _run(_node_graph(layer, lower_float_ort), x))


def test_mxfp4_for_tensorrt_is_refused_from_the_scheme_before_tracing():
    from lrq_deploy.export.lower_float import check_float_target

    with pytest.raises(LrqError, match="TensorRT has no MXFP4 path"):
        check_float_target(QuantScheme.preset("mxfp4"), "trt")
    for preset, target in (("mxfp4", "ort"), ("nvfp4", "trt"), ("fp8", "trt")):
        check_float_target(QuantScheme.preset(preset), target)
    check_float_target(None, "trt")  # full precision


def test_mxfp4_has_no_tensorrt_form():
    layer, _ = _layer("mxfp4")
    with pytest.raises(LrqError, match="TensorRT has no MXFP4 path"):
        _node_graph(layer, lower_float_trt)


def test_uncalibrated_input_scale_is_refused():
    layer, _ = _layer("nvfp4")
    layer.tensor_scales[1] = 0
    with pytest.raises(LrqError, match="input scale was never calibrated"):
        _node_graph(layer, lower_float_ort)


@pytest.mark.parametrize("preset", ["w4a16-nvfp4", "mxfp4"])
def test_bundled_model_exports_and_verifies(tmp_path, preset):
    """The whole model through lrq export: onnxruntime agrees with torch (within the export's own
    verification tolerance; summation order alone moves a few 4-bit input codes across a rounding
    boundary, so the relative perplexity difference stays small, not zero)."""
    out = tmp_path / "ckpt"
    calibrate("bundled:llama", out, QuantScheme.preset(preset), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    report = export_onnx(out, tmp_path / "g.onnx", target="ort", limit=2)
    assert report["verify"]["within_tolerance"]
    assert report["verify"]["relative_difference"] < 1e-3
