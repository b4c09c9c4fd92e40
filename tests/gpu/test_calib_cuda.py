"""GPU checks of calibration (skipped without CUDA)."""

import hashlib

import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.config import CalibConfig, QuantConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _sha(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_offload_on_cuda_matches_resident(tmp_path, tiny_llama_dir):
    qconfig = QuantConfig(wbits=4, abits=4, group_size=32)
    cconfig = CalibConfig(method="lrquant+", nsamples=4, seqlen=32, epochs=2, batch_size=2)
    calibrate(str(tiny_llama_dir), tmp_path / "a", qconfig, cconfig, device="cuda")
    calibrate(str(tiny_llama_dir), tmp_path / "b", qconfig, cconfig, device="cuda", offload=True)
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")


def test_bundled_w4a4_on_cuda(tmp_path):
    from lrq_deploy.eval import evaluate_checkpoint

    calibrate("bundled:llama", tmp_path / "q", QuantConfig(wbits=4, abits=4),
              CalibConfig(method="lrquant+", nsamples=8, seqlen=128, epochs=2), device="cuda")
    result = evaluate_checkpoint(tmp_path / "q", limit=20, device="cuda")
    assert result["fp"]["ppl"] <= result["quant"]["ppl"] < 1.3 * result["fp"]["ppl"]
