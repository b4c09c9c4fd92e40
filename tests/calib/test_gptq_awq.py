"""GPTQ and AWQ: the rounding against a plain reference written here, the identity-Hessian limit,
exact folding, and checkpoints that export, verify and reload."""

import pytest
import torch

from lrq_deploy.calib.blockwise import calibrate_model
from dataclasses import replace

from lrq_deploy.calib.gptq import clip_search, gptq_quantize
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.data import token_windows
from lrq_deploy.models import load_model
from lrq_deploy.quant.primitives import quantize_weight, weight_qparams
from lrq_deploy.quant.scheme import QuantScheme

SCHEMES = [QuantScheme(wbits=4, group_size=16), QuantScheme(wbits=3), QuantScheme(wbits=2, group_size=32),
           QuantScheme(wbits=4, group_size=16, symmetric=True), QuantScheme(wbits=8, group_size=64)]


def _problem(seed=0, rows=24, columns=64, tokens=256):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=gen) / columns**0.5 + torch.eye(columns)
    x = torch.randn(tokens, columns, generator=gen) @ mixing * (torch.rand(columns, generator=gen) * 3 + 0.1)
    weight = torch.randn(rows, columns, generator=gen) * 0.05
    return weight, 2 * x.T @ x / tokens


def reference_gptq(weight, hessian, scheme, damp=0.01, weight_range="minmax"):
    """GPTQ as first written (OBQ order, no lazy batches, no Cholesky): quantize column i, spread
    its error with the inverse Hessian of the remaining columns, then remove column i from that
    inverse. Group parameters from the weight as updated so far, when a group is reached (with
    weight_range "mse": the range searched on that group, as the GPTQ authors' --mse quantizer)."""
    w = weight.double().clone()
    h = hessian.double() + damp * hessian.diagonal().mean().double() * torch.eye(len(hessian), dtype=torch.double)
    hinv = torch.linalg.inv(h)
    size = scheme.group_size or w.shape[1]
    codes = torch.empty(w.shape, dtype=torch.uint8)
    scale = zero = None
    for i in range(w.shape[1]):
        if i % size == 0:
            group = w[:, i:i + size].float()
            factor = clip_search(group, replace(scheme, group_size=None)) if weight_range == "mse" else None
            scale, zero = weight_qparams(group, scheme.wbits, None, scheme.symmetric, factor, factor)
            scale, zero = scale[:, 0].double(), zero[:, 0].double()
        q = (torch.round(w[:, i].float() / scale.float()).double() + zero).clamp(0, 2**scheme.wbits - 1)
        codes[:, i] = q.to(torch.uint8)
        error = (w[:, i] - (q - zero) * scale) / hinv[i, i]
        w[:, i:] -= error[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-sym" if s.symmetric else ""))
@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_gptq_matches_the_plain_reference(scheme, weight_range):
    weight, hessian = _problem()
    codes, _, _ = gptq_quantize(weight, hessian, scheme, block_size=32, clip=weight_range)
    expected = reference_gptq(weight, hessian, scheme, weight_range=weight_range)
    mismatch = (codes != expected).float().mean().item()
    assert mismatch == 0.0, f"{mismatch:.2%} of codes differ"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name + ("-sym" if s.symmetric else ""))
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_identity_hessian_gives_round_to_nearest(scheme, act_order, weight_range):
    """No error to spread: GPTQ's codes are round to nearest's, under the full range or the searched one."""
    weight, _ = _problem(seed=1)
    codes, scale, zero = gptq_quantize(weight, torch.eye(weight.shape[1]), scheme, act_order=act_order,
                                       clip=weight_range)
    factor = clip_search(weight, scheme) if weight_range == "mse" else None
    rtn_scale, rtn_zero = weight_qparams(weight, scheme.wbits, scheme.group_size, scheme.symmetric, factor, factor)
    assert torch.equal(scale, rtn_scale) and torch.equal(zero, rtn_zero)
    assert torch.equal(codes, quantize_weight(weight, rtn_scale, rtn_zero, scheme.wbits, scheme.group_size))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_loss_below_rtn(act_order):
    """The quantity GPTQ minimises, tr((W - Q) H (W - Q)^T), ends below round to nearest's."""
    from lrq_deploy.quant.primitives import dequantize_weight

    scheme = QuantScheme(wbits=3, group_size=16)
    weight, hessian = _problem(seed=2)

    def loss(codes, scale, zero):
        error = weight - dequantize_weight(codes, scale, zero, scheme.group_size)
        return torch.trace(error @ hessian @ error.T).item()

    rtn = weight_qparams(weight, 3, 16, False)
    rtn_loss = loss(quantize_weight(weight, *rtn, 3, 16), *rtn)
    assert loss(*gptq_quantize(weight, hessian, scheme, act_order=act_order)) < 0.8 * rtn_loss


def test_dead_inputs_get_zero_weight_and_no_nan():
    weight, hessian = _problem(seed=3)
    hessian[5, :] = hessian[:, 5] = 0
    codes, scale, zero = gptq_quantize(weight, hessian, QuantScheme(wbits=4, group_size=16))
    assert torch.isfinite(scale).all()
    assert torch.equal(codes[:, 5].float(), zero[:, 0])  # dequantizes to exactly 0


def _batches(loaded, n=4, seqlen=32):
    text = "The quick brown fox jumps over the lazy dog. " * 200
    return token_windows(loaded.tokenizer, text, n, seqlen, seed=0)


def test_awq_scales_fold_exactly(tiny_llama_dir):
    """AWQ's searched scales leave the full-precision block unchanged before quantization."""
    from lrq_deploy.calib import awq

    loaded = load_model(str(tiny_llama_dir))
    adapter = loaded.adapter
    inputs = adapter.capture_block_inputs(loaded.model, _batches(loaded))
    block = adapter.blocks(loaded.model)[0]
    with torch.no_grad():
        before = adapter.run_block(block, inputs.hidden, inputs.kwargs)
    folded = []

    def keep_float(job, grid, clip):  # the scale search and fold of awq_block, without the rounding
        from lrq_deploy.calib.baselines import capture_inputs
        from lrq_deploy.fold import fold_smoothing

        found = capture_inputs(job, [g.linears[0] for g in job.groups])
        for group in job.groups:
            scale, _ = awq.search_scale(job, group, found[group.linears[0]], grid)
            fold_smoothing(job.block, group, scale)
            folded.append(scale)

    from lrq_deploy.calib.blockwise import BlockJob

    job = BlockJob(0, block, adapter, adapter.smooth_groups(loaded.model), adapter.linear_names(block),
                   QuantScheme(wbits=3), CalibConfig.of("awq"), inputs.hidden, inputs.hidden, before, inputs.kwargs,
                   torch.device("cpu"))
    with torch.no_grad():
        keep_float(job, 20, True)
        after = adapter.run_block(block, inputs.hidden, inputs.kwargs)
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in folded)  # the search moved something
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,settings", [("gptq", {}), ("gptq", {"act_order": True}), ("awq", {}),
                                             ("awq", {"clip": False})])
def test_new_methods_beat_rtn_on_block_error(tiny_llama_dir, method, settings):
    errors = {}
    for name, options in (("rtn", {}), (method, settings)):
        loaded = load_model(str(tiny_llama_dir))
        result = calibrate_model(loaded, QuantScheme(wbits=3, group_size=32),
                                 CalibConfig.of(name, nsamples=4, seqlen=32, **options), _batches(loaded), "cpu")
        errors[name] = result.blocks[-1]["mse"]
    assert errors[method] < errors["rtn"]


def test_act_order_checkpoint_exports_verifies_and_reloads(tmp_path, tiny_llama_dir):
    """Act-order GPTQ with groups keeps the stored layout: the checkpoint reloads bit for bit what
    calibration produced, and its ONNX graph verifies in onnxruntime."""
    from lrq_deploy.checkpoint import load_checkpoint, save_checkpoint
    from lrq_deploy.export import export_onnx
    from lrq_deploy.quant import QuantLinear

    scheme, cconfig = QuantScheme(wbits=4, group_size=32), CalibConfig.of("gptq", nsamples=4, seqlen=32, act_order=True)
    loaded = load_model(str(tiny_llama_dir))
    batches = loaded.adapter.calibration_batches(loaded, None, cconfig.nsamples, cconfig.seqlen, cconfig.seed)
    result = calibrate_model(loaded, scheme, cconfig, batches, "cpu")
    save_checkpoint(tmp_path / "ckpt", loaded, result.model, result.quantized, scheme, cconfig.to_dict(), result.blocks)
    reloaded = load_checkpoint(tmp_path / "ckpt").model
    layers = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == len(result.quantized)
    for name, layer in layers.items():
        other = reloaded.get_submodule(name)
        for buffer in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(layer, buffer), getattr(other, buffer)), (name, buffer)
    report = export_onnx(tmp_path / "ckpt", tmp_path / "model.onnx", limit=1)
    assert report["verify"]["relative_difference"] < 1e-3 and report["verify"]["argmax_agreement"] >= 0.995
