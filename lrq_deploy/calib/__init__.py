"""Block-wise calibration: capture block inputs, quantize one block at a time, propagate.

`calibrate` and friends load on first use, so the registry (calib/registry.py) and the method
modules can be read without torch (the CLI builds its options from them).
"""

from importlib import import_module

_EXPORTS = {"calibrate": "api", "calibrate_from_options": "api", "CalibrationResult": "blockwise",
            "calibrate_model": "blockwise", "CalibConfig": "registry"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
