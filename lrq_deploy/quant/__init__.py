"""Quantizer numerics shared by every stage (calibration, checkpoint, export, kernels)."""

from lrq_deploy.quant.linear import QuantLinear
from lrq_deploy.quant.pack import container_bits, pack_codes, unpack_codes
from lrq_deploy.quant.primitives import (
    act_qmax,
    dequantize_weight,
    fake_quant_activation,
    fake_quant_weight,
    gained_scale,
    quantize_activation,
    quantize_activation_asym,
    quantize_weight,
    round_ste,
    weight_qparams,
)

__all__ = [
    "QuantLinear",
    "act_qmax",
    "container_bits",
    "dequantize_weight",
    "fake_quant_activation",
    "fake_quant_weight",
    "gained_scale",
    "pack_codes",
    "quantize_activation",
    "quantize_activation_asym",
    "quantize_weight",
    "round_ste",
    "unpack_codes",
    "weight_qparams",
]
