"""Floating-point quantization grids: FP8 E4M3 (OCP "E4M3FN": no infinities, max 448), FP4 E2M1
(max 6) and the E8M0 power-of-two scale, and the block formats built on them:

- NVFP4: E2M1 values in blocks of 16, each block scaled by an FP8 E4M3 number, the tensor by an
  FP32 number chosen so that the largest block scale lands at E4M3's maximum
  (tensor_scale = amax / (6 * 448)); block_scale = E4M3(block_amax / 6 / tensor_scale).
- MXFP4 (OCP Microscaling v1.0): E2M1 values in blocks of 32 scaled by 2^e (E8M0), with
  e = floor(log2(block_amax)) - 2 (E2M1's largest exponent); values beyond 6 saturate.
- FP8: E4M3 values with one scale per tensor, per output channel or per token (amax / 448).

Rounding is to nearest, ties to even, with saturation to the format's largest finite value, as
TensorRT's and onnxruntime's saturating conversions do; subnormals are kept. `fake_quant_*` pass
gradients straight through the rounding (the scales stay differentiable, so learned clipping
applies). Codes are bit patterns (sign | exponent | mantissa) in uint8, one code per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from lrq_deploy.errors import LrqError

__all__ = ["E2M1", "E4M3", "FloatFormat", "MXFP4_BLOCK", "NVFP4_BLOCK", "decode", "decode_by_table", "e8m0_scale", "encode",
           "encode_by_comparison",
           "fake_quant_fp8", "fake_quant_mxfp4", "fake_quant_nvfp4", "fp8_scale", "mxfp4_quantize",
           "nvfp4_quantize", "round_ste", "round_to_format"]


@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa format without infinities; NaN only where `nan_code` says."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float
    nan_code: int | None = None  # the code (sign bit clear) that is NaN, if any

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (subnormals share it)."""
        return 1 - self.bias

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits


E4M3 = FloatFormat("float8_e4m3fn", exponent_bits=4, mantissa_bits=3, bias=7, max_value=448.0, nan_code=0x7F)
E2M1 = FloatFormat("float4_e2m1", exponent_bits=2, mantissa_bits=1, bias=1, max_value=6.0)
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E2M1_MAX_EXPONENT = 2  # 6 = 1.5 * 2^2


def _exponent(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """floor(log2(a)) for a > 0 (exact, from frexp), never below the format's normal minimum."""
    _, exp = torch.frexp(a)
    return torch.clamp(exp.to(torch.int32) - 1, min=fmt.min_exponent)


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """x (float32) rounded to the nearest value of `fmt`, ties to even, saturating at ±max."""
    x = x.float()
    a = x.abs()
    quantum = torch.ldexp(torch.ones_like(a), _exponent(torch.where(a > 0, a, 1.0), fmt) - fmt.mantissa_bits)
    rounded = torch.round(a / quantum) * quantum  # torch.round: half to even; a / quantum is exact (power of 2)
    return torch.copysign(torch.clamp(rounded, max=fmt.max_value), x)


def encode(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit patterns (uint8) of values already on the grid (round_to_format's output)."""
    a = values.float().abs()
    sign = (torch.signbit(values.float())).to(torch.int32) << (fmt.bits - 1)
    exp = _exponent(torch.where(a > 0, a, 1.0), fmt)
    subnormal = a < 2.0 ** fmt.min_exponent
    field = torch.where(subnormal, 0, exp + fmt.bias)
    scaled = torch.where(subnormal, a / 2.0 ** fmt.min_exponent, torch.ldexp(a, -exp) - 1.0)
    mantissa = torch.round(scaled * (1 << fmt.mantissa_bits)).to(torch.int32)
    return (sign | (field << fmt.mantissa_bits) | mantissa).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """float32 values of bit patterns (NaN for the format's NaN code)."""
    c = codes.to(torch.int32)
    sign = torch.where((c >> (fmt.bits - 1)) & 1 == 1, -1.0, 1.0)
    field = (c >> fmt.mantissa_bits) & ((1 << fmt.exponent_bits) - 1)
    mantissa = (c & ((1 << fmt.mantissa_bits) - 1)).float() / (1 << fmt.mantissa_bits)
    normal = torch.ldexp(1.0 + mantissa, field - fmt.bias)
    sub = mantissa * 2.0 ** fmt.min_exponent
    out = sign * torch.where(field == 0, sub, normal)
    if fmt.nan_code is not None:
        out = torch.where((c & ((1 << (fmt.bits - 1)) - 1)) == fmt.nan_code, float("nan"), out)
    return out


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded - x).detach()


def round_ste(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """round_to_format forward, identity backward (gradients reach x and whatever scaled it)."""
    return _ste(x, round_to_format(x, fmt).to(x.dtype))


# --- FP8 -----------------------------------------------------------------------------------------

def fp8_scale(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """amax / 448 over the whole tensor (dim None) or along `dim` (kept): per tensor, per output
    channel (weights, dim=-1) or per token (activations, dim=-1). Zero amax gives scale 1."""
    return fp8_scale_of(x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True))


def fp8_scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The FP8 scale of values reaching `amax`: amax / 448 (1 where amax is zero)."""
    return torch.where(amax > 0, amax / E4M3.max_value, torch.ones_like(amax))


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> E4M3(x / scale) * scale, gradients straight through the rounding (to x and to a
    learnable scale)."""
    return round_ste(x / scale, E4M3) * scale


# --- 4-bit block formats ---------------------------------------------------------------------------

def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise LrqError(f"the last dimension ({x.shape[-1]}) must be a multiple of the {size}-element block")
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def nvfp4_quantize(x: torch.Tensor, tensor_scale: torch.Tensor | None = None):
    """(codes uint8 [..., K], block scales E4M3 codes [..., K/16], tensor scale float32) of x;
    the tensor scale is amax / (6 * 448) unless given (a calibrated one)."""
    values, block_scale, tensor_scale = _nvfp4_values(x, tensor_scale)
    return encode(values, E2M1).reshape(x.shape), encode(block_scale, E4M3), tensor_scale


def _nvfp4_values(x: torch.Tensor, tensor_scale: torch.Tensor | None = None):
    blocks = _blocks(x.float(), NVFP4_BLOCK)
    if tensor_scale is None:
        amax = blocks.abs().amax()
        tensor_scale = torch.where(amax > 0, amax / (E2M1.max_value * E4M3.max_value), torch.ones_like(amax))
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = round_to_format(block_amax / E2M1.max_value / tensor_scale, E4M3)
    divisor = (block_scale * tensor_scale).unsqueeze(-1)
    values = round_to_format(torch.where(divisor > 0, blocks / torch.where(divisor > 0, divisor, 1.0), 0.0), E2M1)
    return values, block_scale, tensor_scale


def fake_quant_nvfp4(x: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x on the NVFP4 grid (blocks of 16 along the last dimension), gradients straight through
    to x (the scales follow x's values, not its gradient)."""
    values, block_scale, tensor_scale = _nvfp4_values(x.detach(), tensor_scale)
    dequantized = (values * (block_scale * tensor_scale).unsqueeze(-1)).reshape(x.shape)
    return _ste(x, dequantized.to(x.dtype))


def e8m0_scale(block_amax: torch.Tensor) -> torch.Tensor:
    """MX shared scale 2^(floor(log2(amax)) - 2) (an E8M0 power of two; 1 for an all-zero block)."""
    _, exp = torch.frexp(torch.where(block_amax > 0, block_amax, 1.0))
    shared = torch.where(block_amax > 0, exp.to(torch.int32) - 1 - E2M1_MAX_EXPONENT, 0)
    return torch.ldexp(torch.ones_like(block_amax), shared)


def mxfp4_quantize(x: torch.Tensor):
    """(codes uint8 [..., K], E8M0 scale exponents int32 [..., K/32]) of x."""
    values, scale = _mxfp4_values(x)
    _, exp = torch.frexp(scale)
    return encode(values, E2M1).reshape(x.shape), exp.to(torch.int32) - 1


def _mxfp4_values(x: torch.Tensor):
    blocks = _blocks(x.float(), MXFP4_BLOCK)
    scale = e8m0_scale(blocks.abs().amax(dim=-1))
    return round_to_format(blocks / scale.unsqueeze(-1), E2M1), scale


def fake_quant_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """x on the MXFP4 grid (blocks of 32 along the last dimension), gradients straight through."""
    values, scale = _mxfp4_values(x.detach())
    return _ste(x, (values * scale.unsqueeze(-1)).reshape(x.shape).to(x.dtype))


def encode_by_comparison(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """encode(round_to_format(x, fmt)) in comparisons and arithmetic alone (no frexp, no bit
    operations), so a graph can carry it: the exponent is counted against the powers of two the
    format spans. Bit-equal to the frexp form for every finite x (tests/quant/test_floats.py)."""
    x = x.float()
    a = torch.clamp(x.abs(), max=fmt.max_value)  # saturating first rounds to the same value
    quantum = _power_of_two(_counted_exponent(a, fmt) - fmt.mantissa_bits)
    rounded = torch.clamp(torch.round(a / quantum) * quantum, max=fmt.max_value)
    exp = _counted_exponent(rounded, fmt)
    subnormal = rounded < 2.0 ** fmt.min_exponent
    field = torch.where(subnormal, 0.0, exp + fmt.bias)
    steps = 1 << fmt.mantissa_bits
    mantissa = torch.where(subnormal, rounded / 2.0 ** fmt.min_exponent, rounded / _power_of_two(exp) - 1.0) * steps
    negative = (x < 0) | ((x == 0) & ((1.0 / x) < 0))  # -0 keeps its sign, as the hardware conversion does
    code = field * steps + mantissa + negative.float() * (1 << (fmt.bits - 1))
    return code.to(torch.uint8)


def decode_by_table(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """decode(codes, fmt) as a lookup in the format's table of values (one Gather in a graph)."""
    return torch.tensor(_value_table(fmt), dtype=torch.float32, device=codes.device)[codes.long()]


@lru_cache(maxsize=None)
def _value_table(fmt: FloatFormat) -> tuple[float, ...]:
    """Every code's value, worked out once per format (decode_by_table runs per layer and token) in
    plain Python: a cached tensor would keep the mode it was first made in (a graph trace's fake
    tensors) and hand it to later eager calls."""
    values = []
    for code in range(1 << fmt.bits):
        magnitude = code & ((1 << (fmt.bits - 1)) - 1)
        field, mantissa = magnitude >> fmt.mantissa_bits, (magnitude & ((1 << fmt.mantissa_bits) - 1)) / (1 << fmt.mantissa_bits)
        value = math.ldexp(1.0 + mantissa, field - fmt.bias) if field else math.ldexp(mantissa, fmt.min_exponent)
        values.append(float("nan") if magnitude == fmt.nan_code else -value if code >> (fmt.bits - 1) else value)
    return tuple(values)


def _counted_exponent(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """floor(log2(a)) as float, clamped to the format's exponent range: the powers of two a reaches."""
    top = math.floor(math.log2(fmt.max_value))
    exp = torch.full_like(a, float(fmt.min_exponent))
    for k in range(fmt.min_exponent + 1, top + 1):
        exp = exp + (a >= 2.0 ** k).float()
    return exp


def _power_of_two(exp: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, exp)
