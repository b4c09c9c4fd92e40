"""The method registry: a method is one registration, its options are its own, the CLI and the
manifest follow the registry, and no other file needs to know about a new method."""

from dataclasses import dataclass

import onnx
import pytest
import torch

from lrq_deploy.calib.registry import CalibConfig, Method, check_options, get_method, method_names, option, register
from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import QuantScheme


def test_built_in_methods_and_their_options():
    assert method_names()[:5] == ["rtn", "smoothquant", "omniquant", "lrquant", "lrquant+"]
    assert CalibConfig.of("smoothquant", alpha=0.7).options.alpha == 0.7
    assert CalibConfig.of("lrquant", epochs=3).options.epochs == 3
    with pytest.raises(LrqError, match="--alpha does not apply to method lrquant"):
        CalibConfig.of("lrquant", alpha=0.7)
    with pytest.raises(LrqError, match="--epochs does not apply to method rtn"):
        CalibConfig.of("rtn", epochs=3)
    with pytest.raises(LrqError, match="--lr-smooth must be a finite number > 0"):
        CalibConfig.of("lrquant+", lr_smooth=float("nan"))
    with pytest.raises(LrqError, match="method must be one of rtn, "):
        CalibConfig.of("gptq-typo")


def test_manifest_form_round_trips_and_reads_the_flat_form():
    config = CalibConfig.of("omniquant", nsamples=4, alpha=0.6, epochs=2)
    assert CalibConfig.from_dict(config.to_dict()) == config
    flat = {"method": "smoothquant", "nsamples": 4, "seqlen": None, "seed": 0, "alpha": 0.3, "epochs": 10,
            "lr_smooth": 5e-3, "lr_lwc": 1e-2, "batch_size": 1, "compile": False}
    assert CalibConfig.from_dict(flat) == CalibConfig.of("smoothquant", nsamples=4, alpha=0.3)


def test_cli_options_come_from_the_registry():
    from click.testing import CliRunner

    from lrq_deploy.cli import main

    help_text = CliRunner().invoke(main, ["calibrate", "--help"]).output
    for name in ("--alpha", "--epochs", "--lr-smooth", "--lr-lwc", "--compile"):
        assert name in help_text
    result = CliRunner().invoke(main, ["calibrate", "-o", "unused-out", "--method", "lrquant", "--alpha", "0.3"])
    assert result.exit_code == 1 and "--alpha does not apply to method lrquant" in result.output


@dataclass(frozen=True)
class HalfScaleOptions:
    shrink: float = option(0.5, "Shrink weights by this factor before rounding.",
                           lambda v: None if 0 < v <= 1 else "must lie in (0, 1]")

    def __post_init__(self):
        check_options(self)


def _half_scale(job):
    """A toy method: scale every linear's weight, then round to nearest (real helpers, no other file)."""
    from lrq_deploy.calib.baselines import replace_linears

    with torch.no_grad():
        for name in job.linear_names:
            job.block.get_submodule(name).weight.mul_(job.options.shrink)
    replace_linears(job)
    return {"shrink": job.options.shrink}


def test_a_method_defined_here_runs_calibrate_checkpoint_export(tmp_path):
    from lrq_deploy.calib.api import calibrate
    from lrq_deploy.checkpoint import load_checkpoint
    from lrq_deploy.export import export_onnx

    method = register(Method("test-half-scale", HalfScaleOptions, _half_scale, "shrink, then RTN"))
    assert register(method) is method and get_method("test-half-scale") is method
    with pytest.raises(LrqError, match="registered already"):
        register(Method("test-half-scale", HalfScaleOptions, _half_scale, "again"))
    cconfig = CalibConfig.of("test-half-scale", nsamples=2, seqlen=32, shrink=0.9)
    calibrate("bundled:llama", tmp_path / "ckpt", QuantScheme(wbits=4, group_size=64), cconfig, device="cpu")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.method == "test-half-scale" and ckpt.calib["options"] == {"shrink": 0.9}
    assert all(block["shrink"] == 0.9 for block in ckpt.manifest["blocks"])
    report = export_onnx(tmp_path / "ckpt", tmp_path / "model.onnx", limit=1)
    assert report["verify"]["relative_difference"] < 1e-3 and report["verify"]["argmax_agreement"] >= 0.995
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert metadata["lrq.method"] == "test-half-scale"
