"""The float-grid kernels (plugins/float_kernels.py) in Triton's interpreter: FP8 W8A8 and MXFP4
W4A4 layers equal the reference QuantLinear up to the order of float32 sums; NVFP4 (whose
E4M3-scaled dot the interpreter computes wrongly) and weight-only float schemes are refused in one
line. NVFP4 on Blackwell is checked by tests/gpu/test_kernels_cuda.py."""

import pytest
import torch

from lrq_deploy.errors import LrqError
from lrq_deploy.plugins.backend import KernelLinear, use_kernels
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.grids import input_scale_of, weight_grid
from lrq_deploy.quant.scheme import QuantScheme


def _layer(preset: str, n: int, k: int, bias: bool = True, seed: int = 0):
    scheme = QuantScheme.preset(preset)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0.5, n).unsqueeze(1)
    x = torch.randn(3, 7, k, generator=gen) * torch.logspace(-2, 1, k)
    grid = weight_grid(scheme)
    layer = QuantLinear.from_stored(grid.stored(w, grid.qparams(w)), k, torch.randn(n, generator=gen) if bias else None,
                                    scheme)
    layer.tensor_scales[1] = input_scale_of(x.abs().amax() * 0.6, scheme)  # the largest inputs saturate
    return layer, x


@pytest.mark.parametrize("preset, n, k", [("fp8", 40, 160), ("fp8", 130, 64), ("mxfp4", 40, 192), ("mxfp4", 136, 128)])
def test_float_kernels_compute_the_reference(preset, n, k):
    layer, x = _layer(preset, n, k)
    reference = layer(x)
    got = KernelLinear(layer)(x)
    assert got.shape == reference.shape and got.dtype == reference.dtype
    # grid values times power-of-two (or float32) scales are exact; only the float32 sums' order differs
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_nvfp4_and_weight_only_floats_are_refused_clearly():
    layer, x = _layer("nvfp4", 40, 128)
    with pytest.raises(LrqError, match="interpreter computes NVFP4's E4M3-scaled FP4 dot wrongly"):
        KernelLinear(layer)(x)
    model = torch.nn.Sequential(layer)
    with pytest.raises(LrqError, match="interpreter computes NVFP4"):
        use_kernels(model)
    weight_only, _ = _layer("w4a16-nvfp4", 40, 128)
    with pytest.raises(LrqError, match="no kernel for W4A16-nvfp4"):
        use_kernels(torch.nn.Sequential(weight_only))


def test_fp4_kernels_need_in_features_in_whole_tiles():
    layer, x = _layer("mxfp4", 40, 96)
    with pytest.raises(LrqError, match="FP4 kernels need in_features divisible by 64, got 96"):
        KernelLinear(layer)(x)
