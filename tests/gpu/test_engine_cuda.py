"""Engines on a GPU: build each lrq graph for the local GPU, run it, compare with onnxruntime
(build-engine --verify). Skipped without CUDA or without a TensorRT flavour that targets the GPU
(TensorRT for RTX has no SM90 target, so an H100 needs the full `tensorrt`)."""

import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.engine import BuildOptions, build_engine, load_flavour
from lrq_deploy.errors import LrqError
from lrq_deploy.export import export_onnx

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _local_target():
    try:
        flavour = load_flavour()
    except LrqError as exc:
        pytest.skip(str(exc))
    major, minor = torch.cuda.get_device_capability()
    if flavour.name != "tensorrt_rtx":
        return []
    try:
        flavour.compute_capabilities([f"{major}{minor}"])
    except LrqError as exc:
        pytest.skip(str(exc))
    return [f"{major}{minor}"]


@pytest.mark.parametrize("quant", [QuantScheme(wbits=4, group_size=64, symmetric=True), QuantScheme(wbits=4, abits=4, act_asym=False),
                                   QuantScheme(wbits=2, group_size=64), QuantScheme(wbits=4, group_size=64),
                                   QuantScheme(wbits=4, abits=4, act_asym=True)],
                         ids=["w4a16-native", "w4a4-plugin", "w2a16-plugin", "w4a16-asym-plugin", "w4a4-act-asym-plugin"])
def test_engine_matches_onnxruntime(tmp_path, quant):
    targets = _local_target()
    calibrate("bundled:llama", tmp_path / "q", quant, CalibConfig.of(nsamples=2, seqlen=32), device="cuda")
    export_onnx(tmp_path / "q", tmp_path / "m.onnx", target="trt")
    report = build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildOptions(compute_capabilities=targets, verify=True))
    logits = report["verify"]["logits"]
    assert logits["cosine"] > 0.999 and logits["argmax_agreement"] > 0.98
