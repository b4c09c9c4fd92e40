"""Weight and activation quantizers of a scheme: the one object every method, the checkpoint and
the reference forward call, so that a number format is a value of QuantScheme, not a code path.

`weight_grid(scheme)` answers, for a weight [out, in] split into the scheme's groups:
- qparams(w, upper, lower): the group parameters (a tuple of tensors, [out, groups] each, plus a
  tensor-level scale for NVFP4), with learnable clipping factors (LWC) shrinking each group's range;
- fake_quant(w, qparams, row_gain): the differentiable quantize-dequantize the methods train through;
- round_columns(cols, qparams, groups): the same for a few columns (GPTQ's column-by-column rounding);
- stored(w, qparams, row_gain): the checkpoint's buffers (qweight, scales and zeros or tensor_scales);
- dequantize(qweight, scales, third): the reference weight every backend is compared against.

NVFP4's tensor scales (weights' and inputs') are the power of two at or above amax / 2688: the
largest block scale lands in [224, 448] (amax / 2688 would put it at 448, same precision), and
a power of two has an exact reciprocal, so consumers that multiply by it (TensorRT) and those
that divide by its reciprocal (compressed-tensors' global scale, vLLM) compute the same bits.

A per-row gain (LRQuant+) rides on the stored scales, rounded to the scales' own format (float16,
E4M3, a power of two or float32), so what is trained is what is stored.

`fake_quant_input(x, scheme, input_scale)` quantizes a linear's input: integer per-token grids, or
the float grids with their static per-layer scale (input_scale > 0) or, while it is still being
calibrated (input_scale 0 or None), a scale taken from x itself.
"""

from __future__ import annotations

import torch

from lrq_deploy.quant import floats
from lrq_deploy.quant.floats import E2M1, E4M3
from lrq_deploy.quant.pack import pack_codes, unpack_codes
from lrq_deploy.quant.primitives import (
    dequantize_weight, fake_quant_activation, fake_quant_weight, gained_scale, quantize_weight, weight_qparams,
)
from lrq_deploy.quant.scheme import QuantScheme, group_length

__all__ = ["FloatGrid", "IntGrid", "fake_quant_input", "input_scale_of", "nvfp4_tensor_scale", "weight_grid"]

E8M0_BIAS = 127
NVFP4_TENSOR_RANGE = E2M1.max_value * E4M3.max_value  # 2688: tensor scale = amax / 2688


def weight_grid(scheme: QuantScheme) -> "IntGrid | FloatGrid":
    return FloatGrid(scheme) if scheme.float_format else IntGrid(scheme)


def _grouped(w: torch.Tensor, size: int) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1] // size, size)


class IntGrid:
    """Uniform integer codes, scale and zero point per group (quant/primitives.py)."""

    third = "zeros"

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme
        self.bits, self.group_size = scheme.wbits, scheme.group_size

    def qparams(self, w, upper=None, lower=None):
        return weight_qparams(w, self.bits, self.group_size, self.scheme.symmetric, upper, lower)

    def fake_quant(self, w, qparams, row_gain=None):
        scale, zero = qparams
        return fake_quant_weight(w, scale, zero, self.bits, self.group_size, gained_scale(scale, row_gain))

    def round_columns(self, cols, qparams, groups):
        scale, zero = (p[:, groups] for p in qparams)
        q = (torch.round(cols / scale) + zero).clamp(0, 2**self.bits - 1)
        return (q - zero) * scale

    def stored(self, w, qparams, row_gain=None) -> dict[str, torch.Tensor]:
        scale, zero = qparams
        codes = quantize_weight(w, scale, zero, self.bits, self.group_size)
        return {"qweight": pack_codes(codes, self.bits), "scales": gained_scale(scale, row_gain).to(torch.float16),
                "zeros": zero.to(torch.uint8)}

    def dequantize(self, qweight, scales, zeros, in_features: int) -> torch.Tensor:
        codes = unpack_codes(qweight, self.bits)[:, :in_features]
        return dequantize_weight(codes, scales, zeros, self.group_size)

    def buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple, torch.dtype]]:
        groups = in_features // group_length(self.group_size, in_features)
        packed = in_features * self.scheme.container_bits // 8
        return {"qweight": ((out_features, packed), torch.uint8), "scales": ((out_features, groups), torch.float16),
                "zeros": ((out_features, groups), torch.uint8)}


class FloatGrid:
    """FP8 (E4M3, one float32 scale per output channel), NVFP4 (E2M1 in blocks of 16, E4M3 block
    scales, a float32 tensor scale) and MXFP4 (E2M1 in blocks of 32, E8M0 power-of-two scales).

    Stored: qweight = E4M3 bit patterns [out, in] (FP8) or E2M1 codes packed two per byte, low
    nibble first [out, in/2]; scales = float32 [out, 1] (FP8), E4M3 bit patterns (NVFP4) or biased
    E8M0 exponents (MXFP4) [out, in/block]; tensor_scales = float32 [weight tensor scale, input scale].
    """

    third = "tensor_scales"

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme
        self.format = scheme.float_format
        self.values = E4M3 if self.format == "fp8" else E2M1

    def _size(self, in_features: int) -> int:
        return group_length(self.scheme.group_size, in_features)

    def qparams(self, w, upper=None, lower=None):
        """(group scale [out, groups] on the scale's own grid, tensor scale [])."""
        g = _grouped(w, self._size(w.shape[1]))
        hi, lo = g.amax(dim=-1).clamp(min=0), -g.amin(dim=-1).clamp(max=0)
        if upper is not None:
            hi = hi * upper
        if lower is not None:
            lo = lo * lower
        amax = torch.maximum(hi, lo)
        if self.format == "fp8":
            return floats.fp8_scale_of(amax), w.new_ones(())
        if self.format == "nvfp4":
            tensor = nvfp4_tensor_scale(w.detach().abs().amax())
            return floats.round_ste(amax / E2M1.max_value / tensor, E4M3), tensor
        return _e8m0_ste(amax), w.new_ones(())

    def _rescaled(self, scale: torch.Tensor, row_gain: torch.Tensor | None) -> torch.Tensor:
        """A group scale times a per-row gain, back on the scale's grid."""
        if row_gain is None:
            return scale
        gained = scale * row_gain.view(-1, 1)
        if self.format == "nvfp4":
            return floats.round_ste(gained, E4M3)
        if self.format == "mxfp4":
            return torch.exp2(_round_ste(torch.log2(gained)))
        return gained

    def _values(self, g: torch.Tensor, divisor: torch.Tensor, ste: bool = True) -> torch.Tensor:
        """Grid values of g / divisor (0 where a whole group is 0), gradients straight through; without
        `ste` the sign of a value rounded to zero is kept (-0, as hardware conversions write it)."""
        safe = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
        scaled = torch.where(divisor > 0, g / safe, torch.zeros_like(g))
        return floats.round_ste(scaled, self.values) if ste else floats.round_to_format(scaled, self.values)

    def fake_quant(self, w, qparams, row_gain=None):
        scale, tensor = qparams
        g = _grouped(w, self._size(w.shape[1]))
        values = self._values(g, (scale * tensor).unsqueeze(-1))
        return (values * (self._rescaled(scale, row_gain) * tensor).unsqueeze(-1)).reshape(w.shape)

    def round_columns(self, cols, qparams, groups):
        scale, tensor = qparams
        divisor = scale[:, groups] * tensor
        return self._values(cols, divisor) * divisor

    def stored(self, w, qparams, row_gain=None) -> dict[str, torch.Tensor]:
        scale, tensor = (p.detach() for p in qparams)
        g = _grouped(w.detach(), self._size(w.shape[1]))
        codes = floats.encode(self._values(g, (scale * tensor).unsqueeze(-1), ste=False), self.values).reshape(w.shape)
        gained = self._rescaled(scale, None if row_gain is None else row_gain.detach())
        if self.format == "fp8":
            qweight, scales = codes, gained.float()
        else:
            qweight = pack_codes(codes, 4)
            scales = floats.encode(gained, E4M3) if self.format == "nvfp4" else _e8m0_codes(gained)
        tensor_scales = torch.stack([tensor.float().reshape(()), torch.zeros((), device=w.device)])
        return {"qweight": qweight, "scales": scales, "tensor_scales": tensor_scales}

    def dequantize(self, qweight, scales, tensor_scales, in_features: int) -> torch.Tensor:
        if self.format == "fp8":
            codes, group_scale = qweight, scales.float()
        else:
            codes = unpack_codes(qweight, 4)[:, :in_features]
            group_scale = (floats.decode(scales, E4M3) if self.format == "nvfp4"
                           else torch.exp2(scales.float() - E8M0_BIAS))
        values = _grouped(floats.decode(codes, self.values), self._size(in_features))
        return (values * (group_scale * tensor_scales[0].float()).unsqueeze(-1)).reshape(codes.shape)

    def buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple, torch.dtype]]:
        groups = in_features // self._size(in_features)
        if self.format == "fp8":
            weight = ((out_features, in_features), torch.uint8)
            scales = ((out_features, 1), torch.float32)
        else:
            weight = ((out_features, in_features // 2), torch.uint8)
            scales = ((out_features, groups), torch.uint8)
        return {"qweight": weight, "scales": scales, "tensor_scales": ((2,), torch.float32)}


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _e8m0_ste(amax: torch.Tensor) -> torch.Tensor:
    """MX block scale 2^(floor(log2 amax) - 2) (1 for a zero block); the floor passes gradients straight
    through, so learned clipping can move a block's exponent."""
    log = torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))
    exponent = log + (torch.floor(log.detach()) - log).detach() - floats.E2M1_MAX_EXPONENT
    return torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))


def _e8m0_codes(scale: torch.Tensor) -> torch.Tensor:
    _, exp = torch.frexp(scale)
    return (exp.to(torch.int32) - 1 + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power of two at or above amax / 2688 (1 for a zero tensor)."""
    ideal = torch.where(amax > 0, amax.float() / NVFP4_TENSOR_RANGE, torch.ones_like(amax.float()))
    mantissa, exponent = torch.frexp(ideal)  # ideal = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(ideal), exponent - (mantissa == 0.5).to(exponent.dtype))


# --- activations -------------------------------------------------------------------------------------

def input_scale_of(amax: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The static input scale of a layer whose inputs reach `amax` (FP8: amax / 448; NVFP4's tensor
    scale: the power of two at or above amax / 2688; MXFP4 has none: 1)."""
    fmt = scheme.float_format
    if fmt == "mxfp4" or not scheme.quantize_activations:
        return torch.ones_like(amax)
    if fmt == "nvfp4":
        return nvfp4_tensor_scale(amax)
    return floats.fp8_scale_of(amax)


def fake_quant_input(x: torch.Tensor, scheme: QuantScheme, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A quantized linear's input as the scheme quantizes it (x unchanged for 16-bit activations)."""
    if not scheme.quantize_activations:
        return x
    fmt = scheme.aformat
    if fmt == "int":
        return fake_quant_activation(x, scheme.abits, scheme.act_asym)
    if fmt == "mxfp4":
        return floats.fake_quant_mxfp4(x)
    if input_scale is None or not bool(input_scale > 0):
        input_scale = input_scale_of(x.detach().abs().amax().float(), scheme)
    if fmt == "fp8":
        return floats.fake_quant_fp8(x, input_scale.to(x.dtype))
    return floats.fake_quant_nvfp4(x, input_scale.float())
