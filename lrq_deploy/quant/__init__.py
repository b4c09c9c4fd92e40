"""Quantizer numerics shared by every stage (calibration, checkpoint, export, kernels).

The torch parts load on first use, so `lrq_deploy.quant.scheme` and `lrq_deploy.quant.pack`
stay importable without torch (the CLI and the package root use them).
"""

from lrq_deploy.lazy_exports import lazy_getattr

_EXPORTS = {
    "QuantLinear": "linear",
    "QuantScheme": "scheme",
    "container_bits": "pack",
    "pack_codes": "pack",
    "unpack_codes": "pack",
    **{name: "primitives" for name in (
        "act_qmax", "dequantize_weight", "fake_quant_activation", "fake_quant_weight", "gained_scale",
        "quantize_activation", "quantize_activation_asym", "quantize_weight", "round_ste", "weight_qparams",
    )},
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
