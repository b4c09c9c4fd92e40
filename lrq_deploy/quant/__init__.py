"""Quantizer numerics shared by every stage (calibration, checkpoint, export, kernels).

The torch parts load on first use, so `lrq_deploy.quant.scheme` and `lrq_deploy.quant.pack`
stay importable without torch (the CLI and the package root use them).
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
