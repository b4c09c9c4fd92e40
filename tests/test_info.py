"""`lrq info` on a checkpoint, an ONNX graph and an engine: what it is, and whether it is intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrq_deploy.cli import main


def lrq(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("info")
    for args in (["calibrate", "-o", root / "ckpt", "--wbits", "4", "--group-size", "64", "--symmetric", "--nsamples", "2",
                  "--seq-len", "16"],
                 ["export", root / "ckpt", "--onnx", root / "m.onnx", "--limit", "2"],
                 ["export", root / "ckpt", "--onnx", root / "m-trt.onnx", "--target", "trt", "--no-verify"]):
        result = lrq(*args)
        assert result.exit_code == 0, result.output
    return root


def info(target) -> dict:
    result = lrq("info", target, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_checkpoint(artifacts):
    report = info(artifacts / "ckpt")
    assert report["kind"] == "lrq checkpoint" and report["intact"] and report["problems"] == []
    assert report["family"] == "llama" and report["scheme"] == "W4A16-g64" and report["symmetric_weights"]
    assert report["format_version"] == 3 and report["quantized_linears"] == 28
    assert report["files"]["manifest.json"]["check"] == "ok"
    assert report["files"]["model.safetensors"]["check"] == "ok" and len(report["files"]["model.safetensors"]["sha256"]) == 64
    assert {"torch", "lrq-deploy", "safetensors"} <= set(report["versions"])
    text = lrq("info", artifacts / "ckpt").stdout
    assert "W4A16-g64" in text and "model.safetensors" in text and "ok" in text


def test_onnx_with_its_recorded_verification(artifacts):
    report = info(artifacts / "m.onnx")
    assert report["kind"] == "ONNX graph" and report["intact"]
    assert report["lrq"]["scheme"] == "W4A16-g64" and report["lrq"]["target"] == "ort" and report["lrq"]["family"] == "llama"
    assert report["inputs"][0] == {"name": "input_ids", "dtype": "int64", "dims": ["batch", "seq"]}
    assert report["verification"]["argmax_agreement"] > 0.99 and report["verification"]["metric"] == "ppl"
    manifest = json.loads((artifacts / "ckpt" / "manifest.json").read_text())
    assert report["lrq"]["source_weights_sha256"] == manifest["files"]["model.safetensors"]["sha256"]


def test_onnx_changed_after_export_is_not_intact(artifacts, tmp_path):
    import onnx

    model = onnx.load(str(artifacts / "m.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "m.onnx.verify.json").write_text((artifacts / "m.onnx.verify.json").read_text())
    result = lrq("info", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert "records another file's sha256" in result.stderr


def test_engine_built_with_tensorrt_for_rtx(artifacts, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX (extra [rtx])")
    engine = tmp_path / "m.engine"
    built = lrq("build-engine", artifacts / "m-trt.onnx", "-o", engine, "--sm", "89", "--sm", "120")
    assert built.exit_code == 0, built.output
    report = info(engine)
    assert report["kind"] == "TensorRT engine" and report["intact"]
    assert report["flavour"] == "tensorrt_rtx" and report["tensorrt_version"]
    assert report["compute_capabilities"] == ["89", "120"] and report["precision"] == "int4"
    assert report["source_onnx"]["metadata"]["lrq.scheme"] == "W4A16-g64"
    engine.write_bytes(engine.read_bytes() + b"\0")
    result = lrq("info", engine)
    assert result.exit_code == 1 and "does not match the sha256" in result.stderr
