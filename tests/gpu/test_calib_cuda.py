"""GPU checks of calibration (skipped without CUDA); tests that run on both devices are
parametrized by tests/devices.py where their CPU twins live."""

import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bundled_w4a4_on_cuda(tmp_path):
    from lrq_deploy.eval import evaluate_checkpoint

    calibrate("bundled:llama", tmp_path / "q", QuantScheme(wbits=4, abits=4, act_asym=False),
              CalibConfig.of(method="lrquant+", nsamples=8, seqlen=128, epochs=2), device="cuda")
    result = evaluate_checkpoint(tmp_path / "q", limit=20, device="cuda")
    assert result["fp"]["ppl"] <= result["quant"]["ppl"] < 1.3 * result["fp"]["ppl"]


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
