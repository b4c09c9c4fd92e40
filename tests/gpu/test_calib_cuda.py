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


def test_same_seed_gives_identical_checkpoints_on_cuda(tmp_path, tiny_llama_dir):
    """With deterministic algorithms (set by calibrate on CUDA) two runs on one GPU are bit-identical."""
    qconfig = QuantConfig(wbits=4, abits=4, group_size=32)
    cconfig = CalibConfig(method="lrquant+", nsamples=4, seqlen=32, epochs=2, batch_size=2, seed=5)
    for name in ("a", "b"):
        calibrate(str(tiny_llama_dir), tmp_path / name, qconfig, cconfig, device="cuda")
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")


def test_engine_for_another_gpu_is_refused(tmp_path):
    """An engine whose build record names other compute capabilities: one line, before TensorRT runs."""
    import json

    from click.testing import CliRunner

    from lrq_deploy.cli import main
    from lrq_deploy.runtime.flavours import load_flavour
    from lrq_deploy.runtime.engine_record import ENGINE_RECORD
    from lrq_deploy.provenance import sha256_of

    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX")
    flavour = load_flavour("tensorrt_rtx")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    record = {"format": ENGINE_RECORD, "flavour": flavour.name, "tensorrt_version": flavour.version,
              "compute_capabilities": ["75"], "bytes": 6, "sha256": sha256_of(engine)}
    (tmp_path / "m.engine.json").write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["bench", str(engine)])
    assert result.exit_code == 1 and "was built for SM 75" in result.output
