"""Block-wise calibration: capture block inputs, quantize one block at a time, propagate."""

from lrq_deploy.calib.api import calibrate, calibrate_from_options
from lrq_deploy.calib.blockwise import CalibrationResult, calibrate_model

__all__ = ["CalibrationResult", "calibrate", "calibrate_from_options", "calibrate_model"]
