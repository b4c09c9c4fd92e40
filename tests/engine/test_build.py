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
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.engine import BuildOptions, build_engine, parse_shapes
from lrq_deploy.errors import LrqError
from lrq_deploy.export import export_onnx
from lrq_deploy.info import describe

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
    calibrate("bundled:llama", root / "sym", QuantScheme(wbits=4, group_size=64, symmetric=True), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    for name, quant in PLUGIN_GRAPHS.items():
        calibrate("bundled:llama", root / name, quant, CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
        export_onnx(root / name, root / f"{name}-trt.onnx", target="trt", verify=False)
    export_onnx(root / "sym", root / "sym-trt.onnx", target="trt", verify=False)
    export_onnx(root / "sym", root / "sym-ort.onnx", target="ort", verify=False)
    return root


PLUGIN_GRAPHS = {
    "w4a4": QuantScheme(wbits=4, abits=4, act_asym=False),
    "w2a16": QuantScheme(wbits=2, group_size=64),
    "w4a16-asym": QuantScheme(wbits=4, group_size=64),
}
LINEAR_PARAMS = 4 * (2 * 192 * 192 + 2 * 192 * 64 + 3 * 192 * 512)  # 4 layers of q, o, k, v, gate, up, down


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
    saved = LINEAR_PARAMS * 4 - LINEAR_PARAMS // 2  # float32 weights vs packed INT4 codes
    assert "DEQUANTIZE" not in fp["layers"]
    assert fp["bytes"] - single["bytes"] > 0.8 * saved  # the INT4 engine keeps its weights packed


@needs_rtx
def test_cli_build_engine_shapes_and_refused_timing_cache(graphs, tmp_path):
    args = ["build-engine", str(graphs / "sym-trt.onnx"), "-o", str(tmp_path / "a.engine"), "--int4", "--sm", "89",
            "--timing-cache", str(tmp_path / "cache.bin"), "--min-shapes", "input_ids:1x1",
            "--opt-shapes", "input_ids:1x64", "--max-shapes", "input_ids:4x256"]
    (tmp_path / "cache.bin").write_bytes(b"not a timing cache")
    refused = CliRunner().invoke(main, args)  # TensorRT for RTX keeps no timing cache: the option would do nothing
    assert refused.exit_code == 1 and "--timing-cache does nothing with tensorrt_rtx" in refused.output
    assert (tmp_path / "cache.bin").read_bytes() == b"not a timing cache" and not (tmp_path / "a.engine").exists()
    result = CliRunner().invoke(main, [a for a in args if a not in ("--timing-cache", str(tmp_path / "cache.bin"))])
    assert result.exit_code == 0, result.output
    described = describe(tmp_path / "a.engine")
    assert described["intact"] and described["precision"] == "int4" and described["compute_capabilities"] == ["89"]
    assert described["profile"] == {"input_ids": [[1, 1], [1, 64], [4, 256]]}  # the shapes given, as built


@needs_rtx
@pytest.mark.parametrize("name,plugin", [("w4a4", "W4A4Linear"), ("w2a16", "W2A16Linear"), ("w4a16-asym", "W4A16Linear")])
def test_rtx_builds_plugin_engines_for_sm89_and_sm120(graphs, tmp_path, name, plugin):
    report = build_engine(graphs / f"{name}-trt.onnx", tmp_path / "e.engine", BuildOptions(compute_capabilities=["89", "120"]))
    assert report["lrq_plugin_nodes"] == [plugin]
    assert report["layers"]["PLUGIN_V3"] == 28  # one plugin layer per linear
    assert report["plugins"] == "python" and report["lrq_nodes_with_bias"] == 0  # TensorRT for RTX has no AOT plugins
    assert "DEQUANTIZE" not in report["layers"] and "MATRIX_MULTIPLY" in report["layers"]  # attention and lm_head only
    engine = (tmp_path / "e.engine").read_bytes()
    assert plugin.encode() in engine  # the plugin layers are serialized by name, to be found at load time
    described = describe(tmp_path / "e.engine")
    assert described["intact"] and described["compute_capabilities"] == ["89", "120"]
    assert described["layers"]["PLUGIN_V3"] == 28


@needs_rtx
def test_plugin_engines_keep_weights_packed(graphs, tmp_path):
    sizes = {}
    for name in ("w2a16", "w4a16-asym"):  # same group size, scales and zero points: only the codes differ
        sizes[name] = build_engine(graphs / f"{name}-trt.onnx", tmp_path / f"{name}.engine",
                                   BuildOptions(compute_capabilities=["89"]))["bytes"]
    packed_difference = LINEAR_PARAMS * (4 - 2) // 8  # bytes of 4-bit codes minus bytes of 2-bit codes
    assert sizes["w4a16-asym"] - sizes["w2a16"] == pytest.approx(packed_difference, rel=0.05)


def _with_first_plugin_node(src, dst, **changes):
    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.domain == "lrq")
    for key, value in changes.items():
        if key == "op_type":
            node.op_type = value
        else:
            next(a for a in node.attribute if a.name == key).i = value
    onnx.save(model, str(dst))
    return dst


@needs_rtx
def test_graphs_that_cannot_build_are_refused_clearly(graphs, tmp_path):
    with pytest.raises(LrqError, match="no TensorRT plugin for W2A4Linear"):
        build_engine(_with_first_plugin_node(graphs / "w2a16-trt.onnx", tmp_path / "w8.onnx", op_type="W2A4Linear"),
                     tmp_path / "x.engine", BuildOptions(compute_capabilities=["89"]))
    with pytest.raises(LrqError, match="group size 100 does not divide"):
        build_engine(_with_first_plugin_node(graphs / "w2a16-trt.onnx", tmp_path / "g.onnx", group_size=100),
                     tmp_path / "x.engine", BuildOptions(compute_capabilities=["89"]))
    with pytest.raises(LrqError, match="without --no-plugins"):
        build_engine(graphs / "w4a4-trt.onnx", tmp_path / "x.engine", BuildOptions(compute_capabilities=["89"], plugins=False))
    (tmp_path / "cut.onnx").write_bytes((graphs / "w4a4-trt.onnx").read_bytes()[:5000])
    with pytest.raises(LrqError, match="not a readable ONNX model"):
        build_engine(tmp_path / "cut.onnx", tmp_path / "x.engine", BuildOptions(compute_capabilities=["89"]))
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


@pytest.fixture(scope="module")
def float_graphs(tmp_path_factory):
    """The bundled model calibrated for FP8 and NVFP4 (RTN) and exported for TensorRT."""
    root = tmp_path_factory.mktemp("float-engines")
    for preset in ("fp8", "nvfp4"):
        calibrate("bundled:llama", root / preset, QuantScheme.preset(preset), CalibConfig.of(nsamples=2, seqlen=32),
                  device="cpu")
        export_onnx(root / preset, root / f"{preset}-trt.onnx", target="trt", verify=False)
    return root


@needs_rtx
@pytest.mark.parametrize("preset, precision, sm, quantize_layer", [
    ("fp8", "fp8", "89", "QUANTIZE"), ("nvfp4", "fp4", "120", "DYNAMIC_QUANTIZE")])
def test_rtx_builds_float_engines_of_the_bundled_model(float_graphs, tmp_path, preset, precision, sm, quantize_layer):
    """FP8 for SM89 and NVFP4 for SM120 from lrq's own graphs: every linear's input quantized by
    TensorRT (28 = 4 blocks x 7 linears), its weight dequantized from FP8 / FP4 initializers."""
    engine = tmp_path / f"{preset}.engine"
    report = build_engine(float_graphs / f"{preset}-trt.onnx", engine,
                          BuildOptions(precision, compute_capabilities=[sm]))
    assert report[f"{precision}_weights"] == 28 and report["layers"][quantize_layer] == 28
    described = describe(engine)
    assert described["intact"] and described["precision"] == precision and described["compute_capabilities"] == [sm]
    assert described["source_onnx"]["metadata"]["lrq.scheme"] == QuantScheme.preset(preset).name
    assert described["source_onnx"]["metadata"]["lrq.float_layers"] == "28 layers"


def test_precision_must_match_the_graph(graphs, tmp_path):
    with pytest.raises(LrqError, match="--fp8 needs a graph with FP8 weights"):
        build_engine(graphs / "sym-trt.onnx", tmp_path / "x.engine", BuildOptions("fp8"))


@pytest.mark.parametrize("name", list(PLUGIN_GRAPHS))
def test_plugin_layer_computes_the_checkpoint_layer(graphs, name):
    """What a plugin layer runs (run_linear, on the node's own inputs from the graph) equals the checkpoint's layer."""
    import torch

    from lrq_deploy.checkpoint import load_checkpoint
    from lrq_deploy.plugins.trt_plugins import run_linear
    from lrq_deploy.quant import QuantLinear

    model = onnx.load(str(graphs / f"{name}-trt.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.domain == "lrq")
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    qweight, scales, zeros = (torch.from_numpy(inits[i].copy()) for i in node.input[1:4])
    loaded = load_checkpoint(graphs / name).loaded
    layer = next(m for m in loaded.model.modules() if isinstance(m, QuantLinear) and torch.equal(m.qweight, qweight.view(torch.uint8)))
    x = torch.randn(5, attrs["in_features"], generator=torch.Generator().manual_seed(0))
    y = run_linear(attrs, x, qweight.view(torch.uint8), scales, zeros.view(torch.uint8))
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)  # fp32 sums over K = 192 in another order


@needs_rtx
def test_plugin_fields_round_trip_and_format_rules():
    from types import SimpleNamespace

    import tensorrt_rtx_bindings as trt

    from lrq_deploy.plugins.trt_plugins import PLUGIN_NAMES, plugin_attributes, register_plugins

    creators = register_plugins(trt)
    assert register_plugins(trt) == creators  # registering twice is harmless
    names = [c.name for c in creators]
    assert names == list(PLUGIN_NAMES) and {"W2A16Linear", "W3A16Linear", "W4A16Linear", "W4A4Linear", "W8A8Linear"} <= set(names)
    attrs = {"wbits": 2, "abits": 16, "group_size": 64, "in_features": 192, "out_features": 512, "symmetric": 0}
    plugin = creators[names.index("W2A16Linear")].plugin_class("W2A16Linear", attrs, trt.TensorRTPhase.BUILD)
    assert plugin_attributes(plugin.get_fields_to_serialize()) == {**attrs, "act_asym": 0}  # absent: symmetric
    asym = {**attrs, "wbits": 4, "abits": 4, "act_asym": 1}
    w4a4 = creators[names.index("W4A4Linear")].plugin_class("W4A4Linear", asym, trt.TensorRTPhase.BUILD)
    assert plugin_attributes(w4a4.get_fields_to_serialize()) == asym and "act_asym=1" in w4a4.timing_cache_id
    assert plugin.clone().attrs == {**attrs, "act_asym": 0} and plugin.get_output_data_types([trt.DataType.HALF]) == [trt.DataType.HALF]
    desc = lambda t, f=trt.TensorFormat.LINEAR: SimpleNamespace(desc=SimpleNamespace(type=t, format=f))  # noqa: E731
    io = [desc(trt.DataType.HALF), desc(trt.DataType.INT8), desc(trt.DataType.HALF), desc(trt.DataType.INT8), desc(trt.DataType.HALF)]
    assert all(plugin.supports_format_combination(pos, io, 4) for pos in range(5))
    assert not plugin.supports_format_combination(1, [io[0], desc(trt.DataType.INT32)], 4)  # widened weights
    assert not plugin.supports_format_combination(0, [desc(trt.DataType.HALF, trt.TensorFormat.CHW32)], 4)
    assert not plugin.supports_format_combination(4, io[:4] + [desc(trt.DataType.FLOAT)], 4)  # output follows x
    with pytest.raises(LrqError, match="lacks attributes"):
        plugin_attributes([])


def test_child_failures_become_one_line():
    import subprocess

    from lrq_deploy.engine.build import _child_failure

    ours = subprocess.CompletedProcess([], 1, "", "[TRT] [E] noise\nerror: TensorRT cannot parse m.onnx: bad node\n")
    assert _child_failure(ours, "m.onnx") == "TensorRT cannot parse m.onnx: bad node"
    aborted = subprocess.CompletedProcess([], -6, "", "terminate called without an active exception\n")
    assert _child_failure(aborted, "m.onnx") == (
        "TensorRT stopped while building m.onnx (exit status -6): terminate called without an active exception")


@pytest.mark.parametrize("name", list(PLUGIN_GRAPHS))
def test_reference_of_a_plugin_graph_is_the_ort_export(graphs, tmp_path, name):
    """--verify compares engines with onnxruntime on the trt graph rewritten into standard ops:
    that rewrite computes exactly what the `--target ort` export computes."""
    from lrq_deploy.engine.verify import verification_feeds
    from lrq_deploy.export.lower_trt import ort_reference
    from lrq_deploy.runtime.onnxrt import reference_session as ort_session

    model = onnx.load(str(graphs / f"{name}-trt.onnx"))
    feeds = verification_feeds(model, {"input_ids": ((1, 1), (2, 24), (4, 64))})
    assert feeds["input_ids"].shape == (2, 24) and feeds["input_ids"].dtype == np.int64
    onnx.save(ort_reference(model), str(tmp_path / "ref.onnx"))
    export_onnx(graphs / name, tmp_path / "ort.onnx", target="ort", verify=False, fuse=False)  # one node per linear, as trt
    reference = ort_session(tmp_path / "ref.onnx").run(None, feeds)[0]
    np.testing.assert_array_equal(reference, ort_session(tmp_path / "ort.onnx").run(None, feeds)[0])


@needs_rtx
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message given without a GPU")
def test_cli_verify_without_gpu_is_one_line_and_writes_nothing(graphs, tmp_path):
    args = ["build-engine", str(graphs / "w4a4-trt.onnx"), "-o", str(tmp_path / "e.engine"), "--sm", "89", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --verify runs the engine, which needs a CUDA GPU; build without --verify on this machine"]
    assert not (tmp_path / "e.engine").exists()


@needs_rtx
def test_rtx_builds_vit_plugin_engine_with_bias(tmp_path):
    """timm ViT W4A4: every linear has a bias, the plugin's fifth input."""
    calibrate("bundled:vit", tmp_path / "vit", QuantScheme(wbits=4, abits=4, act_asym=False), CalibConfig.of(method="rtn", nsamples=8), device="cpu")
    export_onnx(tmp_path / "vit", tmp_path / "vit-trt.onnx", target="trt", verify=False)
    report = build_engine(tmp_path / "vit-trt.onnx", tmp_path / "vit.engine", BuildOptions(compute_capabilities=["89"]))
    assert report["lrq_plugin_nodes"] == ["W4A4Linear"]
    assert report["lrq_nodes_with_bias"] == report["layers"]["PLUGIN_V3"] == 16  # 4 blocks x qkv, proj, fc1, fc2
