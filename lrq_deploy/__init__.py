"""lrq-deploy: LRQuant post-training quantization, from full precision to low-bit deployment.

Importing the package is cheap (no torch): `lrq --help` and one-line errors come at once. The
Triton kernels choose the interpreter themselves when no CUDA device is present
(lrq_deploy.plugins._triton.load_triton).
"""

from lrq_deploy.config import CalibConfig, QuantConfig
from lrq_deploy.errors import LrqError

__version__ = "0.1.0"
__all__ = ["CalibConfig", "QuantConfig", "LrqError", "__version__"]
