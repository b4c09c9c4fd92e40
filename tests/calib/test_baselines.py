import pytest
import torch

from lrq_deploy.calib.blockwise import calibrate_model
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.data import token_windows
from lrq_deploy.fold import fold_smoothing
from lrq_deploy.models import load_model


def _batches(loaded, n=4, seqlen=32):
    text = "The quick brown fox jumps over the lazy dog. " * 200
    return token_windows(loaded.tokenizer, text, n, seqlen, seed=0)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
def test_fold_smoothing_is_exact(fixture, request):
    """Folding any scale (and shift where the norm has a bias) leaves the block output unchanged."""
    loaded = load_model(str(request.getfixturevalue(fixture)))
    adapter, model = loaded.adapter, loaded.model
    inputs = adapter.capture_block_inputs(model, _batches(loaded))
    block = adapter.blocks(model)[0]
    with torch.no_grad():
        before = adapter.run_block(block, inputs.hidden, inputs.kwargs)
        gen = torch.Generator().manual_seed(1)
        for group in adapter.smooth_groups(model):
            prev = block.get_submodule(group.prev)
            channels = (group.rows[1] - group.rows[0]) if group.rows else (
                prev.weight.shape[0] if group.prev_kind == "linear" else prev.weight.numel())
            scale = torch.rand(channels, generator=gen) + 0.5
            shift = torch.randn(channels, generator=gen) * 0.1 if group.shiftable else None
            fold_smoothing(block, group, scale, shift)
        after = adapter.run_block(block, inputs.hidden, inputs.kwargs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "smoothquant"])
def test_engine_quantizes_every_block_linear(tiny_llama_dir, method):
    loaded = load_model(str(tiny_llama_dir))
    result = calibrate_model(
        loaded, QuantScheme(wbits=4, abits=8, group_size=32, act_asym=False), CalibConfig.of(method=method, nsamples=4, seqlen=32),
        _batches(loaded), "cpu",
    )
    assert len(result.quantized) == 2 * 7
    # W4-g32 A8 keeps every block close to full precision, and the error is real (not zero)
    assert all(0 < b["mse"] < 1e-4 and 0.99 < b["cosine"] < 1.0 for b in result.blocks)
    # the reported block-0 error is the quantized block against the FP block on the same inputs
    fp = load_model(str(tiny_llama_dir))
    inputs = fp.adapter.capture_block_inputs(fp.model, _batches(fp))
    with torch.no_grad():
        fp_out = fp.adapter.run_block(fp.adapter.blocks(fp.model)[0], inputs.hidden, inputs.kwargs)
        q_out = loaded.adapter.run_block(loaded.adapter.blocks(loaded.model)[0], inputs.hidden, inputs.kwargs)
    fp_out, q_out = fp_out.double(), q_out.double()
    mse = ((q_out - fp_out) ** 2).mean().item()
    cosine = torch.nn.functional.cosine_similarity(q_out, fp_out, dim=-1).mean().item()  # per token
    assert mse == pytest.approx(result.blocks[0]["mse"], rel=1e-4)
    assert cosine == pytest.approx(result.blocks[0]["cosine"], rel=1e-7)


def test_smoothquant_beats_rtn_with_activation_outliers(tiny_llama_dir):
    """With outlier channels in the input norm (what SmoothQuant targets), W8A8 error drops."""
    errors = {}
    for method in ("rtn", "smoothquant"):
        loaded = load_model(str(tiny_llama_dir))
        with torch.no_grad():
            for block in loaded.adapter.blocks(loaded.model):
                block.input_layernorm.weight[:4] *= 30.0
        result = calibrate_model(
            loaded, QuantScheme(wbits=8, abits=8, act_asym=False), CalibConfig.of(method=method, nsamples=4, seqlen=32),
            _batches(loaded), "cpu",
        )
        errors[method] = result.blocks[0]["mse"]
    assert errors["smoothquant"] < errors["rtn"]
