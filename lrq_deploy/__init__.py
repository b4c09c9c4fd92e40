"""lrq-deploy: LRQuant post-training quantization, from full precision to low-bit deployment.

Importing the package is cheap (no torch): `lrq --help` and one-line errors come at once. The
Triton kernels choose the interpreter themselves when no CUDA device is present
(lrq_deploy.plugins._triton.load_triton).
"""

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import QuantScheme

__version__ = "0.1.0"
__all__ = ["LrqError", "QuantScheme", "__version__"]
