"""Triton kernels against the reference (dequantize, then matmul). On CPU they run in Triton's
interpreter; integer results are compared bit-exactly, float results within a tolerance that
covers only the summation order (fp32 accumulation over K <= 320 terms)."""

import pytest
import torch
import torch.nn.functional as F

from lrq_deploy.errors import LrqError
from lrq_deploy.plugins import ops
from lrq_deploy.quant import dequantize_weight, pack_codes, quantize_activation, quantize_weight, weight_qparams

GEN = torch.Generator().manual_seed(0)


def _layer(n, k, bits, group, symmetric=False):
    w = torch.randn(n, k, generator=GEN)
    scale, zero = weight_qparams(w, bits, group, symmetric)
    codes = quantize_weight(w, scale, zero, bits, group)
    container = 4 if bits == 3 else bits
    packed = pack_codes(codes, container)
    return packed, scale.half(), zero.to(torch.uint8), dequantize_weight(codes, scale, zero, group)


# shapes include M, N, K that are not multiples of the 64-wide tiles
@pytest.mark.parametrize("m", [1, 3, 5, 70])
@pytest.mark.parametrize("n,k,bits,group", [(96, 128, 4, 32), (130, 192, 4, None), (72, 256, 2, 64), (40, 320, 3, 64)])
def test_weight_only_matches_reference(m, n, k, bits, group):
    packed, scales, zeros, weight = _layer(n, k, bits, group)
    x = torch.randn(m, k, generator=GEN)
    bias = torch.randn(n, generator=GEN)
    y = ops.weight_only_linear(x, packed, scales, zeros, bias, 4 if bits == 3 else bits, group or 0)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_weight_only_keeps_leading_dims():
    packed, scales, zeros, weight = _layer(64, 64, 4, 32)
    x = torch.randn(2, 7, 64, generator=GEN)
    torch.testing.assert_close(ops.weight_only_linear(x, packed, scales, zeros, None, 4, 32), x @ weight.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rows_bit_exact(bits):
    x = torch.randn(37, 100, generator=GEN) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 7.0])  # exact ties round to even
    q, s = ops.quantize_rows(x, bits)
    ref_q, ref_s = quantize_activation(x, bits)
    assert torch.equal(q.to(torch.float32), ref_q) and torch.equal(s, ref_s.squeeze(-1))


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (70, 130, 192), (5, 40, 320)])
def test_w4a4_integer_accumulator_exact(m, n, k):
    packed, scales, zeros, _ = _layer(n, k, 4, None)
    x = torch.randn(m, k, generator=GEN)
    xq, xs = ops.quantize_rows(x, 4)
    y, acc = ops.w4a4_matmul(xq, xs, packed, scales, zeros, None, 0, torch.float32, return_int=True)
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(n, k).to(torch.int64)
    exact = xq.to(torch.int64) @ (codes - zeros.to(torch.int64)).T
    assert torch.equal(acc.to(torch.int64), exact)
    reference = (exact.to(torch.float64) * xs.double()[:, None] * scales.double().T).float()
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("group", [None, 64])
def test_w4a4_linear_matches_fake_quant_reference(group):
    from lrq_deploy.quant import fake_quant_activation

    packed, scales, zeros, weight = _layer(96, 192, 4, group)
    x = torch.randn(3, 9, 192, generator=GEN)
    bias = torch.randn(96, generator=GEN)
    y = ops.w4a4_linear(x, packed, scales, zeros, bias, group or 0)
    torch.testing.assert_close(y, F.linear(fake_quant_activation(x, 4), weight, bias), rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_refused():
    packed, scales, zeros, _ = _layer(64, 64, 4, 32)
    with pytest.raises(LrqError, match="float16, bfloat16 or float32"):
        ops.weight_only_linear(torch.zeros(2, 64, dtype=torch.int32), packed, scales, zeros, None, 4, 32)
    with pytest.raises(LrqError, match="input features"):
        ops.weight_only_linear(torch.zeros(2, 60), packed, scales, zeros, None, 4, 32)
    with pytest.raises(LrqError, match="does not divide"):
        ops.weight_only_linear(torch.zeros(2, 64), packed, scales, zeros, None, 4, 48)
    with pytest.raises(LrqError, match="no kernel for 8-bit"):
        ops.weight_only_linear(torch.zeros(2, 64), packed, scales, zeros, None, 8, 32)
    with pytest.raises(LrqError, match="must be int8"):
        ops.w4a4_matmul(torch.zeros(2, 64), torch.ones(2), packed, scales, zeros, None, 32, torch.float32)


def test_fake_impls_support_torch_compile_tracing():
    packed, scales, zeros, weight = _layer(64, 64, 4, 32)
    x = torch.randn(8, 64, generator=GEN)
    out = torch.library.opcheck(torch.ops.lrq_kernels.weight_only_linear.default, (x, packed, scales, zeros, None, 4, 32),
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in out.values())


@pytest.mark.parametrize("group", [None, 64])
def test_w4a4_fused_equals_two_kernel_path(group):
    packed, scales, zeros, _ = _layer(130, 192, 4, group)
    x = torch.randn(70, 192, generator=GEN) * 2
    bias = torch.randn(130, generator=GEN)
    xq, xs = ops.quantize_rows(x, 4)
    two_step = ops.w4a4_matmul(xq, xs, packed, scales, zeros, bias, group or 0, torch.float32)
    torch.testing.assert_close(ops.w4a4_fused(x, packed, scales, zeros, bias, group or 0), two_step, rtol=1e-6, atol=1e-5)
