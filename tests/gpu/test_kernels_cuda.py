"""The Triton kernels compiled for the GPU (skipped without CUDA): fp16 activations."""

import pytest
import torch
import torch.nn.functional as F

from lrq_deploy.quant import dequantize_weight, fake_quant_activation, pack_codes, quantize_weight, weight_qparams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _layer(n, k, bits, group):
    w = torch.randn(n, k, device="cuda")
    scale, zero = weight_qparams(w, bits, group, False)
    codes = quantize_weight(w, scale, zero, bits, group)
    return pack_codes(codes, bits), scale.half(), zero.to(torch.uint8), dequantize_weight(codes, scale, zero, group)


@pytest.mark.parametrize("m", [1, 4, 16, 130])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, None), (2, 64)])
def test_weight_only_fp16(m, bits, group):
    from lrq_deploy.plugins import ops

    packed, scales, zeros, weight = _layer(512, 1024, bits, group)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    y = ops.weight_only_linear(x, packed, scales, zeros, None, bits, group or 0)
    ref = F.linear(x.float(), weight)
    # fp16 inputs and dequantized fp16 weights: relative error of fp16 rounding over K = 1024 terms
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2 * ref.abs().mean().item())


def test_w4a4_integer_exact_on_gpu():
    from lrq_deploy.plugins import ops

    packed, scales, zeros, weight = _layer(256, 512, 4, None)
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    xq, xs = ops.quantize_rows(x, 4)
    y, acc = ops.w4a4_matmul(xq, xs, packed, scales, zeros, None, 0, torch.float32, return_int=True)
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(256, 512).long()
    assert torch.equal(acc.long(), xq.long() @ (codes - zeros.long()).T)
    torch.testing.assert_close(y, F.linear(fake_quant_activation(x.float(), 4), weight), rtol=1e-3, atol=1e-2)
