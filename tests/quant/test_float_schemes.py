"""Float grids as values of the one scheme: every method calls the scheme's weight grid and input
quantizer, and what is trained (fake quant) is what is stored (checkpoint) and what runs (reference)."""

import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.gptq import gptq_round
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.errors import LrqError
from lrq_deploy.quant import QuantLinear, floats
from lrq_deploy.quant.grids import fake_quant_input, weight_grid
from lrq_deploy.quant.pack import unpack_codes
from lrq_deploy.quant.scheme import PRESETS, KernelFamily, QuantScheme

FLOAT_PRESETS = sorted(PRESETS)


def _weight(out=16, k=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=gen) * torch.logspace(-2, 1, out).unsqueeze(1)
    w[3, :16] = 0  # a zero block
    return w


def test_integer_schemes_are_recorded_as_before_the_formats():
    """Manifests and run directories of integer schemes keep their fields (earlier runs resume, earlier
    checkpoints compare equal); float schemes record their formats."""
    assert QuantScheme(wbits=4, group_size=64).to_dict() == {
        "wbits": 4, "abits": 16, "group_size": 64, "symmetric": False, "act_asym": False}
    assert QuantScheme.from_dict(QuantScheme(wbits=4, abits=8).to_dict()) == QuantScheme(wbits=4, abits=8)
    assert QuantScheme.preset("nvfp4").to_dict()["wformat"] == "nvfp4"


def test_presets_names_attributes_and_refusals():
    names = {p: QuantScheme.preset(p).name for p in PRESETS}
    assert names["nvfp4"] == "W4A4-nvfp4" and names["fp8"] == "W8A8-fp8" and names["w4a16-mxfp4"] == "W4A16-mxfp4"
    for preset in PRESETS:
        scheme = QuantScheme.preset(preset)
        assert QuantScheme.from_attributes(scheme.to_attributes()) == scheme
        assert QuantScheme.from_dict(scheme.to_dict()) == scheme
        assert scheme.kernel is (KernelFamily.FLOAT if scheme.quantize_activations else None)
        assert not scheme.native_int4 and not scheme.act_asym
    with pytest.raises(LrqError, match="nvfp4 weights are 4-bit with blocks of 16: use --wbits 4 --group-size 16"):
        QuantScheme(wbits=4, group_size=32, wformat="nvfp4")
    with pytest.raises(LrqError, match="fp8 activations need fp8 weights"):
        QuantScheme(wbits=4, abits=8, wformat="int", aformat="fp8")
    with pytest.raises(LrqError, match="nvfp4 weights take nvfp4 or 16-bit activations"):
        QuantScheme(wbits=4, abits=8, group_size=16, wformat="nvfp4")
    with pytest.raises(LrqError, match="symmetric by construction"):
        QuantScheme.preset("mxfp4", symmetric=True)
    with pytest.raises(LrqError, match="unknown scheme 'fp4'"):
        QuantScheme.preset("fp4")
    with pytest.raises(LrqError, match="unknown number format"):
        QuantScheme.from_attributes({**QuantScheme.preset("fp8").to_attributes(), "wformat": 9})


@pytest.mark.parametrize("preset", FLOAT_PRESETS)
def test_trained_equals_stored_equals_reference(preset):
    """fake_quant (what methods train through) equals the dequantized checkpoint bit for bit, with
    learned clipping and a per-row gain; the rounded values lie on the format's grid."""
    scheme = QuantScheme.preset(preset)
    grid, w = weight_grid(scheme), _weight()
    groups = w.shape[1] // (scheme.group_size or w.shape[1])
    clip = torch.rand(w.shape[0], groups, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.7
    gain = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(2)) + 0.5
    for upper, row_gain in ((None, None), (clip, gain)):
        qparams = grid.qparams(w, upper, upper)
        trained = grid.fake_quant(w, qparams, row_gain)
        layer = QuantLinear.from_stored(grid.stored(w, qparams, row_gain), w.shape[1], None, scheme)
        assert torch.equal(trained, layer.dequantized_weight())
        assert torch.equal(grid.fake_quant(trained, grid.qparams(trained)), trained) or upper is not None
    assert torch.equal(layer.dequantized_weight()[3, :16], torch.zeros(16))


def test_nvfp4_layout_is_what_tensorrt_and_compressed_tensors_read():
    scheme = QuantScheme.preset("nvfp4")
    grid, w = weight_grid(scheme), _weight()
    stored = grid.stored(w, grid.qparams(w))
    tensor_scale = 2.0 ** torch.ceil(torch.log2(w.abs().amax() / (6 * 448)))  # a power of two: exact reciprocal
    codes, block_scales, _ = floats.nvfp4_quantize(w, tensor_scale)
    # E2M1 codes two per byte, element 2j in the low nibble; E4M3 block scales as float8_e4m3fn bytes
    assert torch.equal(stored["qweight"] & 0xF, codes[:, 0::2]) and torch.equal(stored["qweight"] >> 4, codes[:, 1::2])
    assert torch.equal(stored["scales"], block_scales)
    assert torch.equal(stored["scales"].view(torch.float8_e4m3fn).float(), floats.decode(block_scales, floats.E4M3))
    assert stored["tensor_scales"][0] == tensor_scale and 1 / (1 / tensor_scale) == tensor_scale
    assert 224 <= floats.decode(block_scales, floats.E4M3).max() <= 448  # the largest block scale near E4M3's top
    assert torch.equal(grid.fake_quant(w, grid.qparams(w)), floats.fake_quant_nvfp4(w, tensor_scale))


def test_fp8_weights_match_torchs_float8_cast():
    scheme = QuantScheme.preset("fp8")
    grid, w = weight_grid(scheme), _weight()
    stored = grid.stored(w, grid.qparams(w))
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    assert torch.equal(stored["scales"], scale)
    assert torch.equal(stored["qweight"], (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))


def test_mxfp4_scales_are_biased_e8m0_exponents():
    scheme = QuantScheme.preset("mxfp4")
    grid, w = weight_grid(scheme), _weight()
    stored = grid.stored(w, grid.qparams(w))
    codes, exponents = floats.mxfp4_quantize(w)
    assert torch.equal(stored["scales"].long() - 127, exponents.long())
    assert torch.equal(unpack_codes(stored["qweight"], 4), codes)


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "fp8"])
def test_learned_clipping_gets_gradients(preset):
    scheme = QuantScheme.preset(preset)
    grid, w = weight_grid(scheme), _weight()
    groups = w.shape[1] // (scheme.group_size or w.shape[1])
    factor = torch.full((w.shape[0], groups), 0.9, requires_grad=True)
    gain = torch.ones(w.shape[0], requires_grad=True)
    grid.fake_quant(w, grid.qparams(w, factor, factor), gain).pow(2).sum().backward()
    assert factor.grad.abs().sum() > 0 and gain.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "fp8"])
@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_gptq_with_identity_hessian_is_round_to_nearest(preset, weight_range):
    from lrq_deploy.calib.gptq import clip_search

    scheme = QuantScheme.preset(preset)
    grid, w = weight_grid(scheme), _weight()
    rounded, qparams = gptq_round(w, torch.eye(w.shape[1]), scheme, damp=0.0, clip=weight_range)
    factor = clip_search(w, scheme) if weight_range == "mse" else None
    assert torch.equal(rounded, grid.fake_quant(w, grid.qparams(w, factor, factor)))
    x = torch.randn(256, w.shape[1]) * torch.linspace(0.1, 3, w.shape[1])
    hessian = x.T @ x / len(x)
    spread, qparams = gptq_round(w, hessian, scheme)
    rtn = grid.fake_quant(w, grid.qparams(w))
    assert ((x @ (spread - w).T) ** 2).sum() < ((x @ (rtn - w).T) ** 2).sum()
    assert torch.equal(grid.fake_quant(spread, qparams), spread)  # still on the grid


def test_inputs_use_the_static_scale_once_calibrated():
    x = torch.randn(4, 64) * 3
    fp8 = QuantScheme.preset("fp8")
    scale = x.abs().amax() / 448
    assert torch.equal(fake_quant_input(x, fp8), fake_quant_input(x, fp8, scale))
    half = fake_quant_input(x, fp8, scale / 2)  # a smaller calibrated range saturates at 448 * scale / 2
    assert half.abs().max() == 448 * (scale / 2)
    nv = QuantScheme.preset("nvfp4")
    tensor_scale = 2.0 ** torch.ceil(torch.log2(x.abs().amax() / (6 * 448)))
    assert torch.equal(fake_quant_input(x, nv), floats.fake_quant_nvfp4(x, tensor_scale))
    assert torch.equal(fake_quant_input(x, QuantScheme.preset("w4a16-nvfp4")), x)


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "gptq", "lrquant", "lrquant+"])
def test_methods_calibrate_float_schemes_and_checkpoints_reload(tiny_llama_dir, tmp_path, method):
    """NVFP4 W4A4 through the method, written, reloaded: the reloaded model reproduces the in-memory
    result, every layer's static input scale is calibrated, and the block error is small."""
    scheme = QuantScheme.preset("nvfp4")
    settings = {"epochs": 1} if method.startswith("lrquant") else {}
    out = tmp_path / "ckpt"
    summary = calibrate(str(tiny_llama_dir), out, scheme, CalibConfig.of(method=method, nsamples=2, seqlen=32,
                                                                         **settings), device="cpu")
    assert summary["scheme"] == "W4A4-nvfp4"
    ckpt = load_checkpoint(out)
    layers = [m for m in ckpt.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.config == scheme and m.input_scale > 0 for m in layers)
    tokens = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    again = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(ckpt.model(tokens).logits, again.model(tokens).logits)


def test_nvfp4_tensor_scale_is_the_power_of_two_at_or_above_amax_over_2688():
    from lrq_deploy.quant.grids import nvfp4_tensor_scale

    amax = torch.tensor([2688.0, 2689.0, 1344.0, 1000.0, 1e-30, 0.0])
    assert nvfp4_tensor_scale(amax).tolist() == [1.0, 2.0, 0.5, 0.5, 2.0 ** -111, 1.0]
