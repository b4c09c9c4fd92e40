"""`lrq::quant_linear`: the torch custom op a QuantLinear becomes in a traced graph.

Its eager implementation is the reference QuantLinear arithmetic, so torch.export keeps one
node per quantized linear with the packed weights as inputs; export/ops.py translates that
node into ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrq_deploy.quant.grids import fake_quant_input, weight_grid
from lrq_deploy.quant.scheme import QuantScheme


@torch.library.custom_op("lrq::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
    wbits: int, abits: int, group_size: int, symmetric: int, act_asym: int, wformat: int, aformat: int,
    in_features: int,
) -> torch.Tensor:
    """Reference: the input quantized as the scheme says, the dequantized weight, linear. The integer
    arguments are QuantScheme.to_attributes() and in_features; `zeros` holds the zero points of an
    integer grid or the [weight tensor scale, input scale] of a float grid (QuantLinear.weight_tensors)."""
    scheme = QuantScheme.from_attributes(dict(wbits=wbits, abits=abits, group_size=group_size, symmetric=symmetric,
                                              act_asym=act_asym, wformat=wformat, aformat=aformat))
    x = fake_quant_input(x, scheme, zeros[1] if scheme.float_format else None)
    weight = weight_grid(scheme).dequantize(qweight, scales, zeros, in_features) if scheme.quantize_weights else qweight
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@quant_linear.register_fake
def _(x, qweight, scales, zeros, bias, wbits, abits, group_size, symmetric, act_asym, wformat, aformat, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
