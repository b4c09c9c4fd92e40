import pytest
import torch

from lrq_deploy.errors import LrqError
from lrq_deploy.quant import (
    dequantize_weight,
    fake_quant_activation,
    fake_quant_weight,
    pack_codes,
    quantize_activation,
    quantize_weight,
    unpack_codes,
    weight_qparams,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_unpack_roundtrip_every_code(bits):
    codes = torch.arange(2**bits, dtype=torch.uint8).repeat(3, 8)  # every code, in every slot
    codes = codes[:, torch.randperm(codes.shape[1], generator=torch.Generator().manual_seed(bits))]
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


def test_int4_nibble_order_low_first():
    packed = pack_codes(torch.tensor([[0x1, 0xA, 0xF, 0x0]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0xA1, 0x0F]]


def test_int2_order_low_bits_first():
    packed = pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2)
    assert packed.tolist() == [[0b00_11_10_01]]


def test_pack_rejects_out_of_range_and_odd_length():
    with pytest.raises(LrqError):
        pack_codes(torch.tensor([[16, 0]], dtype=torch.uint8), 4)
    with pytest.raises(LrqError):
        pack_codes(torch.tensor([[1, 0, 1]], dtype=torch.uint8), 4)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 16, False), (4, None, True), (2, 8, False), (3, 16, True), (8, None, False)])
def test_fake_quant_equals_dequantized_codes_exactly(bits, group_size, symmetric):
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    scale, zero = weight_qparams(w, bits, group_size, symmetric)
    codes = quantize_weight(w, scale, zero, bits, group_size)
    assert int(codes.max()) < 2**bits
    assert torch.equal(fake_quant_weight(w, scale, zero, bits, group_size), dequantize_weight(codes, scale, zero, group_size))


def test_weight_qparams_hand_computed():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = weight_qparams(w, 2, None, symmetric=False)
    assert scale.item() == pytest.approx(1.0, rel=1e-3)  # (2 - (-1)) / 3, rounded to fp16
    assert zero.item() == 1.0
    codes = quantize_weight(w, scale, zero, 2, None)
    # round(w / s) + z: -1 -> 0, 0 -> 1, 0.5 rounds half to even -> 0 + 1 = 1, 2 -> 3
    assert codes.tolist() == [[0, 1, 1, 3]]


def test_symmetric_zero_point_and_range():
    w = torch.tensor([[-3.0, 1.0, 3.0, 0.0]])
    scale, zero = weight_qparams(w, 4, None, symmetric=True)
    assert zero.item() == 8 and scale.item() == pytest.approx(3 / 7, rel=1e-3)
    assert quantize_weight(w, scale, zero, 4, None).tolist() == [[1, 10, 15, 8]]


def test_lwc_factors_shrink_the_range():
    w = torch.tensor([[-1.0, 2.0]])
    scale, _ = weight_qparams(w, 4, None, False, upper_factor=torch.tensor([[0.5]]), lower_factor=torch.tensor([[1.0]]))
    assert scale.item() == pytest.approx(2.0 / 15, rel=1e-3)


def test_activation_per_token_symmetric():
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 1.0, -0.1]])
    q, scale = quantize_activation(x, 4)
    assert torch.allclose(scale.squeeze(-1), torch.tensor([1 / 7, 2 / 7]))
    assert q.abs().max() <= 7 and torch.equal(q, q.round())
    assert torch.allclose(fake_quant_activation(x, 8), x, atol=2 / 127)


def test_ste_gradients_flow():
    w = torch.randn(4, 8, requires_grad=True)
    scale, zero = weight_qparams(w.detach(), 4, None, False)
    fake_quant_weight(w, scale, zero, 4, None).sum().backward()
    codes = quantize_weight(w.detach(), scale, zero, 4, None)
    interior = (codes > 0) & (codes < 15)
    assert interior.any() and torch.all(w.grad[interior] == 1.0)
