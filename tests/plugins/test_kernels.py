"""Triton kernels against the reference (dequantize, then matmul), every route of the dispatch
table. On CPU they run in Triton's interpreter.

Tolerances: integer results are compared bit-exactly. Float32 results differ from the
reference only by summation order and, for the GEMV, by applying the zero point once per group
(s * (sum q x - z sum x)), over K <= 320 terms: rtol 1e-5 / atol 1e-4 covers a few float32
ulps of the partial sums. float16 / bfloat16 outputs are rounded once to their type
(relative 2^-11 / 2^-8) after float32 accumulation."""

import pytest
import torch
import torch.nn.functional as F

import launches  # tests/plugins/launches.py
from lrq_deploy.errors import LrqError
from lrq_deploy.plugins import dispatch, ops
from lrq_deploy.quant import (
    dequantize_weight, fake_quant_activation, pack_codes, quantize_activation, quantize_activation_asym, quantize_weight,
    weight_qparams,
)
from lrq_deploy.quant.scheme import KernelFamily

GEN = torch.Generator().manual_seed(0)


def _layer(n, k, bits, group, symmetric=False):
    w = torch.randn(n, k, generator=GEN)
    scale, zero = weight_qparams(w, bits, group, symmetric)
    codes = quantize_weight(w, scale, zero, bits, group)
    container = 4 if bits == 3 else 8 if bits in (6, 8) else bits
    packed = pack_codes(codes, container)
    return packed, scale.half(), zero.to(torch.uint8), dequantize_weight(codes, scale, zero, group)


def test_dispatch_routes_by_rows():
    weight_only = KernelFamily.WEIGHT_ONLY
    assert [dispatch.route_for(weight_only, m) for m in (1, 8, 9, 256, 257)] == ["gemv", "gemv", "gemm", "gemm", "dequantize"]
    assert {dispatch.route_for(KernelFamily.INTEGER, m) for m in (1, 64, 4096)} == {"int_gemm"}


# M covers every weight-only route (gemv <= 8 < gemm <= 256 < dequantize); N, K, M are not
# multiples of the tiles; K = 130 and 200 (per channel) need rows padded to 16 bytes.
@pytest.mark.parametrize("m", [1, 3, 8, 70, 300])
@pytest.mark.parametrize("n,k,bits,group", [
    (96, 128, 4, 32), (130, 192, 4, None), (72, 256, 2, 64), (40, 320, 3, 64), (24, 130, 4, None), (20, 200, 2, None),
])
def test_weight_only_matches_reference(m, n, k, bits, group):
    packed, scales, zeros, weight = _layer(n, k, bits, group)
    x = torch.randn(m, k, generator=GEN)
    bias = torch.randn(n, generator=GEN)
    y = ops.weight_only_linear(x, packed, scales, zeros, bias, 4 if bits == 3 else bits, group or k)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_gemv_split_over_k_is_deterministic_and_exact_to_tolerance():
    packed, scales, zeros, weight = _layer(16, 4096, 4, 128)
    launch = dispatch.plan("gemv", 1, 16, 4096, 128, 4)
    assert launch.split_k > 1  # the partial sums path
    x = torch.randn(1, 4096, generator=GEN)
    y = ops.weight_only_linear(x, packed, scales, zeros, None, 4, 128)
    assert torch.equal(y, ops.weight_only_linear(x, packed, scales, zeros, None, 4, 128))
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=2e-4)


def test_gemv_split_past_k_reads_no_scale_beyond_the_row():
    """When splits x chunks per program exceed K's chunks, the last program's extra chunk must add
    nothing: its group index lies past the last row's scales (here: NaN-filled memory after them)."""
    n, k, group = 40, 320, 64
    launch = dispatch.plan("gemv", 8, n, k, group, 4)
    chunks = -(-k // launch.constexprs["BLOCK_K"])
    if launch.split_k * launch.constexprs["K_ITERS"] == chunks:
        pytest.skip("this dispatch table gives the shape no chunk beyond K")
    packed, scales, zeros, weight = _layer(n, k, 3, group)
    poisoned = torch.full((scales.numel() + 64,), float("nan"), dtype=scales.dtype)
    poisoned[: scales.numel()] = scales.flatten()
    x = torch.randn(8, k, generator=GEN)
    y = ops.weight_only_linear(x, packed, poisoned[: scales.numel()].view(n, -1), zeros, None, 4, group)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 20, 300])
def test_weight_only_half_precision(dtype, m):
    packed, scales, zeros, weight = _layer(96, 256, 4, 64)
    x = torch.randn(m, 256, generator=GEN).to(dtype)
    y = ops.weight_only_linear(x, packed, scales, zeros, None, 4, 64)
    assert y.dtype == dtype
    reference = F.linear(x.float(), weight.to(dtype).float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), reference, rtol=2 * eps, atol=2 * eps * reference.abs().max().item())


def test_dequantize_route_is_the_reference_weight():
    """The prefill route's dequantized weight equals the reference cast to the activations' type
    ((q - z) * s is exact in float32, then rounded once)."""
    from lrq_deploy.plugins import kernels

    packed, scales, zeros, weight = _layer(40, 192, 4, 64)
    launch = dispatch.plan("dequantize", 512, 40, 192, 64, 4)
    words = ops.kernel_words(packed)
    out = torch.empty(40, 192, dtype=torch.float16)
    kernels.dequantize[launch.grid](words, scales, zeros, out, 40, 192, 3, words.shape[1], **launch.constexprs)
    assert torch.equal(out, weight.half())


def test_weight_only_keeps_leading_dims():
    packed, scales, zeros, weight = _layer(64, 64, 4, 32)
    x = torch.randn(2, 7, 64, generator=GEN)
    torch.testing.assert_close(ops.weight_only_linear(x, packed, scales, zeros, None, 4, 32), x @ weight.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rows_bit_exact(bits):
    x = torch.randn(37, 100, generator=GEN) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 7.0])  # exact ties round to even
    q, s, z = ops.quantize_rows(x, bits)
    ref_q, ref_s = quantize_activation(x, bits)
    assert torch.equal(q.to(torch.float32), ref_q) and torch.equal(s, ref_s.squeeze(-1)) and not z.any()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rows_asymmetric_bit_exact(bits):
    """Codes, scales and zero points equal quant/primitives.py's, every token, positive-only and
    negative-only tokens included (their range is widened to contain 0)."""
    x = torch.randn(37, 100, generator=GEN) * 3 + 1
    x[1] = x[1].abs() + 0.5  # all positive: zero point 0
    x[2] = -x[2].abs() - 0.5  # all negative: zero point 2^b - 1
    q, s, z = ops.quantize_rows(x, bits, True)
    ref_q, ref_s, ref_z = quantize_activation_asym(x, bits)
    centre = 2 ** (bits - 1)
    assert torch.equal(q.to(torch.float32) + centre, ref_q) and torch.equal(s, ref_s.squeeze(-1))
    assert torch.equal(z.to(torch.float32) + centre, ref_z.squeeze(-1))
    assert ref_z[1] == 0 and ref_z[2] == 2**bits - 1


def _exact_accumulator(xq, packed, zeros, n, k, wbits, xz=None):
    from lrq_deploy.quant import unpack_codes

    codes = unpack_codes(packed, 4 if wbits == 3 else 8 if wbits in (6, 8) else wbits)[:, :k].to(torch.int64)
    x = xq.to(torch.int64) - (0 if xz is None else xz.to(torch.int64)[:, None])
    return x @ (codes - zeros.to(torch.int64)).T


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (70, 130, 192), (5, 40, 320)])
@pytest.mark.parametrize("wbits,abits", [(4, 4), (4, 8), (8, 8), (6, 6), (3, 4)])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_integer_accumulator_exact(m, n, k, wbits, abits, asym):
    """int32 accumulators equal sum_k (xq - xz)(q - z) in int64: the asymmetric zero-point
    correction included, K not a multiple of the K tile (192, 320) included."""
    packed, scales, zeros, _ = _layer(n, k, wbits, None)
    x = torch.randn(m, k, generator=GEN) + (0.7 if asym else 0.0)
    xq, xs, xz = ops.quantize_rows(x, abits, asym)
    bits = 8 if wbits in (6, 8) else 4
    y, acc = launches.integer_matmul_with_accumulator(xq, xs, xz if asym else None, packed, scales, zeros, None, bits, abits, k, torch.float32)
    exact = _exact_accumulator(xq, packed, zeros, n, k, wbits, xz if asym else None)
    assert torch.equal(acc.to(torch.int64), exact)
    reference = (exact.to(torch.float64) * xs.double()[:, None] * scales.double().T).float()
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("wbits,abits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_integer_linear_matches_fake_quant_reference(group, wbits, abits, asym):
    packed, scales, zeros, weight = _layer(96, 192, wbits, group)
    x = torch.randn(3, 9, 192, generator=GEN) + (0.5 if asym else 0.0)
    bias = torch.randn(96, generator=GEN)
    y = ops.integer_linear(x, packed, scales, zeros, bias, 4 if wbits == 4 else 8, abits, group or 192, asym)
    torch.testing.assert_close(y, F.linear(fake_quant_activation(x, abits, asym), weight, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("wbits", [4, 8])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_integer_fused_equals_two_kernel_path(group, wbits, asym):
    packed, scales, zeros, _ = _layer(130, 192, wbits, group)
    x = torch.randn(70, 192, generator=GEN) * 2 + (1.0 if asym else 0.0)
    bias = torch.randn(130, generator=GEN)
    abits = 4 if wbits == 4 else 8
    xq, xs, xz = ops.quantize_rows(x, abits, asym)
    two_step = ops.integer_matmul(xq, xs, xz if asym else None, packed, scales, zeros, bias, wbits, abits, group or 192,
                                  torch.float32)
    fused = launches.integer_fused(x, packed, scales, zeros, bias, wbits, abits, group or 192, asym)
    torch.testing.assert_close(fused, two_step, rtol=1e-6, atol=1e-5)


def test_bad_inputs_are_refused():
    packed, scales, zeros, _ = _layer(64, 64, 4, 32)
    with pytest.raises(LrqError, match="float16, bfloat16 or float32"):
        ops.weight_only_linear(torch.zeros(2, 64, dtype=torch.int32), packed, scales, zeros, None, 4, 32)
    with pytest.raises(LrqError, match="input features"):
        ops.weight_only_linear(torch.zeros(2, 60), packed, scales, zeros, None, 4, 32)
    with pytest.raises(LrqError, match="does not divide"):
        ops.weight_only_linear(torch.zeros(2, 64), packed, scales, zeros, None, 4, 48)
    with pytest.raises(LrqError, match="no weight-only kernel for 8-bit"):
        ops.weight_only_linear(torch.zeros(2, 64), packed, scales, zeros, None, 8, 32)
    with pytest.raises(LrqError, match="must be int8"):
        ops.integer_matmul(torch.zeros(2, 64), torch.ones(2), None, packed, scales, zeros, None, 4, 4, 32, torch.float32)
    with pytest.raises(LrqError, match="whole 8-code words"):
        dispatch.plan("gemv", 1, 64, 64, 4, 4)


def test_fake_impls_support_torch_compile_tracing():
    packed, scales, zeros, weight = _layer(64, 64, 4, 32)
    x = torch.randn(8, 64, generator=GEN)
    out = torch.library.opcheck(torch.ops.lrq_kernels.weight_only_linear.default, (x, packed, scales, zeros, None, 4, 32),
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in out.values())
