"""Block-wise calibration: capture block inputs, quantize one block at a time, propagate.

`calibrate` and friends load on first use, so the registry (calib/registry.py) and the method
modules can be read without torch (the CLI builds its options from them).
"""

from lrq_deploy.lazy_exports import lazy_getattr

_EXPORTS = {"calibrate": "api", "calibrate_from_options": "api", "CalibrationResult": "blockwise",
            "calibrate_model": "blockwise", "CalibConfig": "registry"}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
