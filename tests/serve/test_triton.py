"""Triton Inference Server model repositories from `lrq export --triton-repo` and
`lrq build-engine --triton-repo`: config.pbtxt parsed with Triton's own ModelConfig protobuf."""

import hashlib

import onnx
import pytest
from click.testing import CliRunner

from lrq_deploy.calib.api import calibrate
from lrq_deploy.cli import main
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason='needs lrq-deploy[serve]')


def _parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "w4"
    calibrate("bundled:llama", out, QuantScheme(wbits=4, group_size=64), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    return out


def _export(checkpoint, tmp_path, *extra):
    args = ["export", str(checkpoint), "--onnx", str(tmp_path / "w4.onnx"), "--no-verify", "--triton-repo",
            str(tmp_path / "repo"), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return tmp_path / "repo" / "w4"


def test_triton_repo_of_a_prefill_graph(checkpoint, tmp_path):
    model_dir = _export(checkpoint, tmp_path)
    config = _parse(model_dir / "config.pbtxt")
    assert config.name == "w4" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    (ids,), (logits,) = config.input, config.output
    assert (ids.name, model_config_pb2.DataType.Name(ids.data_type), list(ids.dims)) == ("input_ids", "TYPE_INT64", [-1])
    assert (logits.name, model_config_pb2.DataType.Name(logits.data_type)) == ("logits", "TYPE_FP32")
    assert list(logits.dims) == [-1, 2048]  # batch axis left to max_batch_size; sequence dynamic; vocabulary
    assert _sha(model_dir / "1" / "model.onnx") == _sha(tmp_path / "w4.onnx")


def test_triton_repo_of_a_decoder_declares_the_kv_cache(checkpoint, tmp_path):
    model_dir = _export(checkpoint, tmp_path, "--with-past")
    config = _parse(model_dir / "config.pbtxt")
    graph = onnx.load(str(tmp_path / "w4.onnx")).graph
    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert [o.name for o in config.output] == [o.name for o in graph.output]
    past = {i.name: list(i.dims) for i in config.input if i.name.startswith("past.")}
    assert len(past) == 8 and all(dims == [2, -1, 32] for dims in past.values())  # kv heads, cache length, head dim
    assert not config.HasField("dynamic_batching")  # caches of different lengths do not stack


def test_triton_repo_is_checked_before_work_and_not_overwritten(checkpoint, tmp_path):
    (tmp_path / "repo" / "w4").mkdir(parents=True)
    (tmp_path / "repo" / "w4" / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--onnx", str(tmp_path / "w4.onnx"), "--no-verify",
                                       "--triton-repo", str(tmp_path / "repo")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "w4.onnx").exists() and (tmp_path / "repo" / "w4" / "mine.txt").read_text() == "keep"


def test_triton_repo_for_a_tensorrt_rtx_engine_is_refused_before_building(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX")
    from lrq_deploy.export import export_onnx

    export_onnx("bundled:llama", tmp_path / "fp.onnx", verify=False)
    result = CliRunner().invoke(main, ["build-engine", str(tmp_path / "fp.onnx"), "-o", str(tmp_path / "e.engine"),
                                       "--fp16", "--sm", "89", "--triton-repo", str(tmp_path / "repo")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: Triton's TensorRT backend runs engines of full TensorRT; --triton-repo needs --flavour tensorrt "
        "(this build uses TensorRT for RTX)"]
    assert not (tmp_path / "e.engine").exists() and not (tmp_path / "repo").exists()


def test_triton_repo_for_python_plugin_engines_is_refused_before_building(tmp_path, monkeypatch):
    """Full TensorRT without ahead-of-time plugins embeds lrq nodes as Python plugins, which Triton
    cannot load: refused with the build's own plugin decision, before anything is built."""
    import types

    from lrq_deploy.engine.build import _check_triton_target
    from lrq_deploy.engine.requirements import BuildOptions, plugin_kind
    from lrq_deploy.errors import LrqError
    from lrq_deploy.plugins import trt_aot

    full = types.SimpleNamespace(name="tensorrt")
    requirements = {"lrq_plugin_nodes": ["W4A4Linear"], "lrq_nodes_with_bias": 0}
    options = BuildOptions(triton_repo=tmp_path / "repo")
    monkeypatch.setattr(trt_aot, "supports_aot", lambda: False)
    assert plugin_kind(full, requirements) == "python"
    with pytest.raises(LrqError, match="lrq Python plugin layers, which Triton's TensorRT backend cannot load"):
        _check_triton_target(options, full, tmp_path / "e.engine", requirements)
    monkeypatch.setattr(trt_aot, "supports_aot", lambda: True)
    assert plugin_kind(full, requirements) == "aot"
    _check_triton_target(options, full, tmp_path / "e.engine", requirements)  # ahead-of-time plugins serve
    assert plugin_kind(full, {"lrq_plugin_nodes": [], "lrq_nodes_with_bias": 0}) is None
    assert not (tmp_path / "repo" / "e").exists()
