"""The Triton kernels compiled for the GPU (skipped without CUDA): half-precision activations,
every route of the dispatch table, integer paths bit-exact. Integer references run on the CPU
(CUDA has no int64 matmul)."""


import pytest
import torch
import torch.nn.functional as F

from script_loader import load_module

launches = load_module("tests/plugins/launches.py")
from lrq_deploy.quant import dequantize_weight, fake_quant_activation, pack_codes, quantize_weight, unpack_codes, weight_qparams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _layer(n, k, bits, group):
    w = torch.randn(n, k, device="cuda")
    scale, zero = weight_qparams(w, bits, group, False)
    codes = quantize_weight(w, scale, zero, bits, group)
    return pack_codes(codes, bits), scale.half(), zero.to(torch.uint8), dequantize_weight(codes, scale, zero, group)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 8, 16, 130, 512])  # gemv, gemv, gemv, gemm, gemm, dequantize + cuBLAS
@pytest.mark.parametrize("bits,group", [(4, 128), (4, None), (2, 64)])
def test_weight_only_half_precision(m, bits, group, dtype):
    from lrq_deploy.plugins import ops

    packed, scales, zeros, weight = _layer(512, 1024, bits, group)
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    y = ops.weight_only_linear(x, packed, scales, zeros, None, bits, group or 1024)
    ref = F.linear(x.float(), weight.to(dtype).float())
    # half-precision products summed in float32 over K = 1024, one rounding of the output
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().mean().item())


def test_gemv_is_deterministic_on_gpu():
    from lrq_deploy.plugins import ops

    packed, scales, zeros, _ = _layer(4096, 8192, 4, 128)
    x = torch.randn(1, 8192, device="cuda", dtype=torch.float16)
    first = ops.weight_only_linear(x, packed, scales, zeros, None, 4, 128)
    assert all(torch.equal(first, ops.weight_only_linear(x, packed, scales, zeros, None, 4, 128)) for _ in range(5))


@pytest.mark.parametrize("m", [1, 64, 1024])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_integer_exact_on_gpu(m, group, asym):
    from lrq_deploy.plugins import ops

    packed, scales, zeros, weight = _layer(256, 512, 4, group)
    x = torch.randn(m, 512, device="cuda", dtype=torch.float16) + (0.5 if asym else 0.0)
    xq, xs, xz = ops.quantize_rows(x, 4, asym)
    if group is None:
        y, acc = launches.integer_matmul_with_accumulator(xq, xs, xz if asym else None, packed, scales, zeros, None, 4, 4, 512, torch.float32)
        codes = unpack_codes(packed.cpu(), 4).long()
        centred = xq.cpu().long() - (xz.cpu().long()[:, None] if asym else 0)
        assert torch.equal(acc.cpu().long(), centred @ (codes - zeros.cpu().long()).T)
    y = ops.integer_linear(x.float(), packed, scales, zeros, None, 4, 4, group or 512, asym)
    torch.testing.assert_close(y, F.linear(fake_quant_activation(x.float(), 4, asym), weight), rtol=1e-3, atol=1e-2)
    fused = launches.integer_fused(x.float(), packed, scales, zeros, None, 4, 4, group or 512, asym)
    torch.testing.assert_close(fused, y, rtol=1e-6, atol=1e-5)


def _capability() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@pytest.mark.parametrize("preset, oldest", [("fp8", 89), ("nvfp4", 100), ("mxfp4", 100)])
def test_float_kernels_on_their_tensor_cores(preset, oldest):
    """FP8 (SM89+) and NVFP4 / MXFP4 (SM100+) layers equal the reference up to float32 summation order;
    older GPUs are refused in one line."""
    from lrq_deploy.errors import LrqError
    from lrq_deploy.plugins.backend import KernelLinear
    from lrq_deploy.quant import QuantLinear
    from lrq_deploy.quant.grids import input_scale_of, weight_grid
    from lrq_deploy.quant.scheme import QuantScheme

    scheme = QuantScheme.preset(preset)
    w, x = torch.randn(4096, 2048), torch.randn(2, 64, 2048) * torch.logspace(-2, 1, 2048)
    grid = weight_grid(scheme)
    layer = QuantLinear.from_stored(grid.stored(w, grid.qparams(w)), 2048, None, scheme)
    layer.tensor_scales[1] = input_scale_of(x.abs().amax(), scheme)
    reference = layer(x)
    layer, x = layer.cuda(), x.cuda()
    if _capability() < oldest:
        with pytest.raises(LrqError, match="need compute capability"):
            KernelLinear(layer)(x)
        return
    got = KernelLinear(layer)(x).cpu()
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
