"""Stateless quantization primitives.

Weights: unsigned integer codes q in [0, 2^b - 1], group-wise (or per output channel)
scale s and zero point z, dequantized as (q - z) * s. Symmetric weights use z = 2^(b-1).
Scales are rounded to float16 when computed, because float16 is what the checkpoint and
every backend store: the value calibrated is the value deployed.

Activations: per-token dynamic quantization. Symmetric (default): q = clamp(round(x / s), -Q, Q),
s = max(max|x|, eps) / Q with Q = 2^(b-1) - 1. Asymmetric: the token's range [min(x, 0), max(x, 0)]
(it always contains 0, so the zero point is a code) mapped onto [0, 2^b - 1]:
s = max(hi - lo, eps) / (2^b - 1), z = round(-lo / s), q = clamp(round(x / s) + z, 0, 2^b - 1),
dequantized as (q - z) * s. `torch.round` rounds half to even, as ONNX QuantizeLinear does.

Everything here is differentiable through a straight-through estimator (STE) so the same
functions serve the learnable calibration methods.
"""

from __future__ import annotations

import torch

from lrq_deploy.quant.scheme import group_length

__all__ = [
    "act_qmax",
    "dequantize_weight",
    "fake_quant_activation",
    "fake_quant_weight",
    "gained_scale",
    "quantize_activation",
    "quantize_activation_asym",
    "quantize_weight",
    "round_ste",
    "weight_qparams",
]

SCALE_MIN = 6.2e-5  # smallest normal float16, so a stored scale never underflows
ACT_SCALE_MIN = 1e-5


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size] (one group per row when group_size is None)."""
    out_features, in_features = w.shape
    size = group_length(group_size, in_features)
    return w.reshape(out_features, in_features // size, size)


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    upper_factor: torch.Tensor | None = None,
    lower_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, each [out, groups].

    upper_factor / lower_factor (in (0, 1], shape [out, groups]) shrink the max / min of each
    group: learnable weight clipping (LWC). The range always contains 0 so that the zero
    point is an integer code in [0, 2^b - 1].
    """
    g = _grouped(w, group_size)
    wmax = g.amax(dim=-1).clamp(min=0)
    wmin = g.amin(dim=-1).clamp(max=0)
    if upper_factor is not None:
        wmax = wmax * upper_factor
    if lower_factor is not None:
        wmin = wmin * lower_factor
    qmax = 2**bits - 1
    if symmetric:
        absmax = torch.maximum(wmax, -wmin)
        scale = absmax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (wmax - wmin) / qmax
    scale = scale.clamp(min=SCALE_MIN).to(torch.float16).to(w.dtype)
    if not symmetric:
        zero = round_ste(-wmin / scale).clamp(0, qmax)
    return scale, zero


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Integer codes (uint8, [out, in]) of w under the given scale / zero point."""
    g = _grouped(w, group_size)
    q = torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).reshape(w.shape).to(torch.uint8)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None, dtype=torch.float32
) -> torch.Tensor:
    """(q - z) * s, broadcast over groups. The reference every backend is compared against."""
    g = _grouped(codes.to(dtype), group_size)
    return ((g - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).reshape(codes.shape)


def fake_quant_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None,
    dequant_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable quantize-dequantize; equals dequantize_weight(quantize_weight(...)) exactly.

    dequant_scale (default: scale) lets a learned per-row factor ride on the stored scale:
    codes come from `scale`, values from `dequant_scale`.
    """
    g = _grouped(w, group_size)
    z = zero.unsqueeze(-1)
    q = (round_ste(g / scale.unsqueeze(-1)) + z).clamp(0, 2**bits - 1)
    out_scale = scale if dequant_scale is None else dequant_scale
    return ((q - z) * out_scale.unsqueeze(-1)).reshape(w.shape)


def gained_scale(scale: torch.Tensor, row_gain: torch.Tensor | None) -> torch.Tensor:
    """Scale times a per-output-row gain, rounded to float16 like every stored scale."""
    if row_gain is None:
        return scale
    return (scale * row_gain.view(-1, 1)).to(torch.float16).to(scale.dtype)


def act_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_activation(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) symmetric dynamic quantization: (integer values as x.dtype, scale [..., 1])."""
    qmax = act_qmax(bits)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_SCALE_MIN) / qmax
    q = round_ste(x / scale).clamp(-qmax, qmax)
    return q, scale


def quantize_activation_asym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (last dim) asymmetric dynamic quantization: (codes in [0, 2^b - 1] as x.dtype,
    scale [..., 1], zero point [..., 1] as x.dtype integers in [0, 2^b - 1])."""
    levels = 2**bits - 1
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    scale = (hi - lo).clamp(min=ACT_SCALE_MIN) / levels
    zero = round_ste(-lo / scale)
    q = (round_ste(x / scale) + zero).clamp(0, levels)
    return q, scale, zero


def fake_quant_activation(x: torch.Tensor, bits: int, asym: bool = False) -> torch.Tensor:
    if asym:
        q, scale, zero = quantize_activation_asym(x, bits)
        return (q - zero) * scale
    q, scale = quantize_activation(x, bits)
    return q * scale


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix of Sylvester's construction (n a power of two), entries +-1, float64
    (rotate.py's rotations, the KV cache's key rotation)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h
