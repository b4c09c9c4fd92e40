"""Launcher of the float-grid kernels (float_kernels.py) as the torch custom op
`lrq_kernels::float_linear`: the input quantized as the reference quantizes it (quant/grids.py:
FP8 with the layer's static scale, NVFP4 / MXFP4 blocks with their scales), then the FP8 or
block-scaled FP4 tensor-core GEMM on the checkpoint's buffers as stored.

Where each runs: FP8 from SM89, FP4 from SM100 (one clear error elsewhere). Triton's CPU
interpreter runs FP8 and MXFP4 exactly; its block-scaled dot with E4M3 scales (NVFP4) is wrong,
so NVFP4 is refused there rather than computed wrongly.
"""

from __future__ import annotations

import torch

from lrq_deploy.errors import LrqError
from lrq_deploy.quant import floats
from lrq_deploy.quant.grids import E8M0_BIAS
from lrq_deploy.quant.pack import pack_codes
from lrq_deploy.quant.scheme import FORMATS, QuantScheme

from . import float_kernels
from ._triton import interpreted

MIN_SM = {"fp8": 89, "nvfp4": 100, "mxfp4": 100}


def check_float_kernel_runs(scheme: QuantScheme, device: torch.device) -> None:
    """One clear error where the float kernel of `scheme` cannot run (or would compute wrongly)."""
    fmt = scheme.float_format
    if not scheme.quantize_activations:
        raise LrqError(f"no kernel for {scheme.name} (float kernels serve FP8 W8A8 and NVFP4 / MXFP4 W4A4); "
                       "use the reference backend")
    if device.type != "cuda":
        if fmt == "nvfp4" and interpreted():
            raise LrqError("Triton's CPU interpreter computes NVFP4's E4M3-scaled FP4 dot wrongly: run the kernels on "
                           "an SM100 / SM120 GPU, or use the reference backend")
        return
    major, minor = torch.cuda.get_device_capability(device)
    if 10 * major + minor < MIN_SM[fmt]:
        raise LrqError(f"{scheme.name} kernels need compute capability {MIN_SM[fmt] // 10}.{MIN_SM[fmt] % 10} or newer "
                       f"(this GPU: {major}.{minor}); use the reference backend")


def _quantized_input(x2: torch.Tensor, scheme: QuantScheme, input_scale: torch.Tensor):
    """(codes as the kernel reads them, block scales or None, the input's scalar factor)."""
    fmt = scheme.float_format
    if fmt == "fp8":
        codes = (x2.float() / input_scale).clamp(-floats.E4M3.max_value, floats.E4M3.max_value)
        return codes.to(torch.float8_e4m3fn), None, input_scale.float()
    if fmt == "nvfp4":
        codes, block_scales, _ = floats.nvfp4_quantize(x2, input_scale.float())
        return pack_codes(codes, 4), block_scales.view(torch.float8_e4m3fn), input_scale.float()
    codes, exponents = floats.mxfp4_quantize(x2)
    return pack_codes(codes, 4), (exponents + E8M0_BIAS).to(torch.uint8), torch.ones((), device=x2.device)


@torch.library.custom_op("lrq_kernels::float_linear", mutates_args=())
def float_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, tensor_scales: torch.Tensor,
    bias: torch.Tensor | None, wformat: int, block: int,
) -> torch.Tensor:
    """A float-grid W8A8 / W4A4 layer (wformat: index in FORMATS; block: the scale block, 0 per channel)."""
    scheme = QuantScheme.preset(FORMATS[wformat])
    check_float_kernel_runs(scheme, x.device)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], qweight.shape[0]
    xq, xs, x_factor = _quantized_input(x2, scheme, tensor_scales[1])
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_arg = None if bias is None else bias.contiguous()
    if scheme.float_format == "fp8":
        tiles = dict(float_kernels.FP8_TILES)
        launch = {"num_warps": tiles.pop("num_warps"), "num_stages": tiles.pop("num_stages")}
        grid = (-(-m // tiles["BLOCK_M"]), -(-n // tiles["BLOCK_N"]))
        float_kernels.fp8_linear[grid](xq, qweight.view(torch.float8_e4m3fn), scales.reshape(-1).float().contiguous(),
                                      bias_arg, y, float(x_factor), m, n, k, **tiles, **launch)
    else:
        tiles = dict(float_kernels.FP4_TILES)
        if k % tiles["BLOCK_K"]:
            raise LrqError(f"FP4 kernels need in_features divisible by {tiles['BLOCK_K']}, got {k}")
        launch = {"num_warps": tiles.pop("num_warps"), "num_stages": tiles.pop("num_stages")}
        grid = (-(-m // tiles["BLOCK_M"]), -(-n // tiles["BLOCK_N"]))
        w_scales = scales.view(torch.float8_e4m3fn) if scheme.float_format == "nvfp4" else scales
        alpha = float(x_factor * tensor_scales[0].float())  # powers of two (NVFP4) or 1 (MXFP4): exact
        float_kernels.fp4_linear[grid](xq, xs, qweight, w_scales.contiguous(), bias_arg, y, alpha, m, n, k,
                                      SCALE_BLOCK=block, **tiles, **launch)
    return y.reshape(*x.shape[:-1], n)


@float_linear.register_fake
def _(x, qweight, scales, tensor_scales, bias, wformat, block):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
