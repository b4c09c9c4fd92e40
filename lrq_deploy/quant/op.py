"""`lrq::quant_linear`: the torch custom op a QuantLinear becomes in a traced graph.

Its eager implementation is the reference QuantLinear arithmetic, so torch.export keeps one
node per quantized linear with the packed weights as inputs; export/ops.py translates that
node into ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrq_deploy.quant.pack import unpack_codes
from lrq_deploy.quant.primitives import dequantize_weight, fake_quant_activation
from lrq_deploy.quant.scheme import group_from_attr


@torch.library.custom_op("lrq::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
    wbits: int, abits: int, group_size: int, symmetric: int, act_asym: int, in_features: int,
) -> torch.Tensor:
    """Reference: per-token activation fake quant (abits < 16; asymmetric with act_asym), dequantized
    weight, linear. The integer arguments are QuantScheme.to_attributes() and in_features (symmetry
    is carried for the lowering; the stored zero points already encode it)."""
    if abits < 16:
        x = fake_quant_activation(x, abits, bool(act_asym))
    if wbits < 16:
        codes = unpack_codes(qweight, wbits)[:, :in_features]
        weight = dequantize_weight(codes, scales, zeros, group_from_attr(group_size))
    else:
        weight = qweight
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@quant_linear.register_fake
def _(x, qweight, scales, zeros, bias, wbits, abits, group_size, symmetric, act_asym, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
