"""The kernel-backed torch backend reproduces the reference perplexity of a checkpoint."""

import pytest

from lrq_deploy.calib.api import calibrate
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.eval import evaluate_checkpoint
from lrq_deploy.plugins.backend import KernelLinear, use_kernels
from lrq_deploy.quant import QuantLinear


@pytest.mark.parametrize("qconfig", [
    QuantScheme(wbits=4, group_size=64), QuantScheme(wbits=2, group_size=64), QuantScheme(wbits=4, abits=4, act_asym=False),
    QuantScheme(wbits=8, abits=8, act_asym=False), QuantScheme(wbits=4, abits=4, act_asym=True),
], ids=lambda q: q.name)
def test_kernel_backend_reproduces_reference_perplexity(tmp_path, qconfig):
    out = tmp_path / "ckpt"
    calibrate("bundled:llama", out, qconfig, CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    # 64-token windows keep the interpreter's work small (the gemm route: 8 < M <= 256)
    reference = evaluate_checkpoint(out, limit=1, compare_fp=False, seq_len=64)["quant"]["ppl"]
    kernels = evaluate_checkpoint(out, limit=1, compare_fp=False, backend="torch", seq_len=64)["quant"]["ppl"]
    assert abs(kernels - reference) / reference < 0.005
    loaded = load_checkpoint(out).loaded
    use_kernels(loaded.model)
    assert not any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert sum(isinstance(m, KernelLinear) for m in loaded.model.modules()) == 28


def test_unsupported_configuration_is_refused(tmp_path):
    out = tmp_path / "w8"
    calibrate("bundled:llama", out, QuantScheme(wbits=8, abits=16), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    with pytest.raises(LrqError, match="no kernel for W8A16"):
        evaluate_checkpoint(out, limit=1, backend="torch")
