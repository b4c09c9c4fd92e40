"""Every weight-rounding method added to the registry goes the whole way from the command line
on the bundled model: calibrate -> eval -> export (onnxruntime and TensorRT graphs, both
verified) -> lrq info."""

import json

import pytest
from click.testing import CliRunner

from lrq_deploy.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def last_json(output: str) -> dict:
    """The JSON object that ends the output (after any progress lines)."""
    lines = output.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


@pytest.mark.parametrize("method,options", [
    ("gptq", ["--act-order"]),
    ("awq", []),
    ("lrquant", ["--rounding", "gptq", "--epochs", "1"]),
])
def test_method_through_calibrate_eval_export_info(tmp_path, method, options):
    ckpt = tmp_path / "ckpt"
    run("calibrate", "-o", ckpt, "--method", method, *options, "--wbits", "4", "--group-size", "64",
        "--nsamples", "2", "--seq-len", "32")
    result = last_json(run("eval", ckpt, "--limit", "1", "--seq-len", "64", "--json"))
    assert result["method"] == method and result["quant"]["ppl"] < 1.2 * result["fp"]["ppl"]
    for target in ("ort", "trt"):
        graph = tmp_path / f"{target}.onnx"
        run("export", ckpt, "--onnx", graph, "--target", target, "--limit", "1")
        info = last_json(run("info", graph, "--json"))
        assert info["intact"] and info["lrq"]["method"] == method and info["lrq"]["target"] == target, info
        assert info["verification"]["relative_difference"] < 1e-3, info["verification"]
        assert info["verification"]["logits"]["passed"], info["verification"]
    info = last_json(run("info", ckpt, "--json"))
    assert info["kind"] == "lrq checkpoint" and info["method"] == method and info["intact"], info
