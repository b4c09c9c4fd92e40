"""lrq-deploy: LRQuant post-training quantization, from full precision to low-bit deployment."""

from lrq_deploy.config import CalibConfig, QuantConfig
from lrq_deploy.errors import LrqError

__version__ = "0.1.0"
__all__ = ["CalibConfig", "QuantConfig", "LrqError", "__version__"]
