"""Engine building: TensorRT for RTX builds real engines on a CPU-only machine; without any
TensorRT, build-engine stops with one clear line."""

import builtins

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from lrq_deploy.calib.api import calibrate
from lrq_deploy.cli import main
from lrq_deploy.config import CalibConfig, QuantConfig
from lrq_deploy.engine import BuildOptions, build_engine, parse_shapes
from lrq_deploy.errors import LrqError
from lrq_deploy.export import export_onnx

def _have_rtx():
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        return False
    return True


needs_rtx = pytest.mark.skipif(not _have_rtx(), reason="TensorRT for RTX is not installed (extra [rtx])")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    calibrate("bundled:llama", root / "sym", QuantConfig(wbits=4, group_size=64, symmetric=True), CalibConfig(nsamples=2, seqlen=32), device="cpu")
    calibrate("bundled:llama", root / "w4a4", QuantConfig(wbits=4, abits=4), CalibConfig(nsamples=2, seqlen=32), device="cpu")
    export_onnx(root / "sym", root / "sym-trt.onnx", target="trt")
    export_onnx(root / "sym", root / "sym-ort.onnx", target="ort", verify=False)
    export_onnx(root / "w4a4", root / "w4a4-trt.onnx", target="trt")
    return root


def _dequantized_copy(src, dst):
    """The same graph with every INT4 weight expanded to float32 (what an unquantized engine holds)."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        w = inits[node.input[0]]
        raw = np.frombuffer(w.raw_data, np.uint8)
        codes = np.stack([raw & 15, raw >> 4], 1).reshape(-1)[: int(np.prod(w.dims))].astype(np.int16)
        codes = np.where(codes >= 8, codes - 16, codes).reshape(w.dims).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]])
        block = next(a.i for a in node.attribute if a.name == "block_size")
        weight = codes * np.repeat(scale, block, axis=0)
        model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), node.output[0]))
        model.graph.node.remove(node)
    onnx.save(model, str(dst))


@needs_rtx
def test_rtx_builds_native_int4_engine_for_sm89_and_sm120(graphs, tmp_path):
    report = build_engine(graphs / "sym-trt.onnx", tmp_path / "int4.engine", BuildOptions(compute_capabilities=["89", "120"]))
    assert report["flavour"] == "tensorrt_rtx"
    assert report["layers"]["DEQUANTIZE"] == 28 and report["int4_weights"] == 28
    _dequantized_copy(graphs / "sym-trt.onnx", tmp_path / "fp32.onnx")
    fp = build_engine(tmp_path / "fp32.onnx", tmp_path / "fp32.engine", BuildOptions("fp16", compute_capabilities=["89"]))
    single = build_engine(graphs / "sym-trt.onnx", tmp_path / "one.engine", BuildOptions(compute_capabilities=["89"]))
    linear_params = 4 * (2 * 192 * 192 + 2 * 192 * 64 + 3 * 192 * 512)  # 4 layers of q, o, k, v, gate, up, down
    saved = linear_params * 4 - linear_params // 2  # float32 weights vs packed INT4 codes
    assert "DEQUANTIZE" not in fp["layers"]
    assert fp["bytes"] - single["bytes"] > 0.8 * saved  # the INT4 engine keeps its weights packed


@needs_rtx
def test_cli_build_engine_with_timing_cache(graphs, tmp_path):
    args = ["build-engine", str(graphs / "sym-trt.onnx"), "-o", str(tmp_path / "a.engine"), "--int4", "--sm", "89",
            "--timing-cache", str(tmp_path / "cache.bin"), "--min-shapes", "input_ids:1x1",
            "--opt-shapes", "input_ids:1x64", "--max-shapes", "input_ids:4x256"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.engine").stat().st_size > 0
    assert not (tmp_path / "cache.bin").exists()  # TensorRT for RTX keeps no timing cache


@needs_rtx
def test_graphs_that_cannot_build_are_refused_clearly(graphs, tmp_path):
    with pytest.raises(LrqError, match="lrq TensorRT plugins"):
        build_engine(graphs / "w4a4-trt.onnx", tmp_path / "x.engine", BuildOptions(compute_capabilities=["89"]))
    with pytest.raises(LrqError, match="export with --target trt"):
        build_engine(graphs / "sym-ort.onnx", tmp_path / "x.engine", BuildOptions(compute_capabilities=["89"]))
    with pytest.raises(LrqError, match="cannot target"):
        build_engine(graphs / "sym-trt.onnx", tmp_path / "x.engine", BuildOptions(compute_capabilities=["90"]))
    assert not list(tmp_path.glob("*.engine"))


def test_without_tensorrt_one_clear_line(graphs, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name.startswith("tensorrt"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    monkeypatch.setattr("importlib.import_module", lambda name: no_tensorrt(name))
    result = CliRunner().invoke(main, ["build-engine", str(graphs / "sym-trt.onnx"), "-o", str(tmp_path / "e.engine")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == ["error: TensorRT is not installed: pip install 'lrq-deploy[trt]' (TensorRT) or 'lrq-deploy[rtx]' (TensorRT for RTX)"]


def test_parse_shapes():
    assert parse_shapes("input_ids:1x128,past.0.key:1x2x64x32") == {"input_ids": (1, 128), "past.0.key": (1, 2, 64, 32)}
    with pytest.raises(LrqError):
        parse_shapes("input_ids=1x2")


@needs_rtx
def test_rtx_builds_fp8_engine_for_sm89(tmp_path):
    from qdq_graphs import fp8_linear

    fp8_linear(tmp_path / "fp8.onnx")
    report = build_engine(tmp_path / "fp8.onnx", tmp_path / "fp8.engine", BuildOptions("fp8", compute_capabilities=["89"]))
    assert report["fp8_weights"] == 2 and report["layers"]["QUANTIZE"] == 1  # weight + activation zero point and report["layers"]["DEQUANTIZE"] == 2


@needs_rtx
def test_rtx_builds_nvfp4_engine_for_sm120(tmp_path):
    from qdq_graphs import nvfp4_linear

    nvfp4_linear(tmp_path / "fp4.onnx")
    report = build_engine(tmp_path / "fp4.onnx", tmp_path / "fp4.engine", BuildOptions("fp4", compute_capabilities=["120"]))
    assert report["fp4_weights"] == 1 and report["layers"]["DYNAMIC_QUANTIZE"] == 1


def test_precision_must_match_the_graph(graphs, tmp_path):
    with pytest.raises(LrqError, match="--fp8 needs a graph with FP8 weights"):
        build_engine(graphs / "sym-trt.onnx", tmp_path / "x.engine", BuildOptions("fp8"))
