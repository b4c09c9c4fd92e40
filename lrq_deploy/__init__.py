"""lrq-deploy: LRQuant post-training quantization, from full precision to low-bit deployment."""

import os as _os

import torch as _torch

# Without a CUDA device, Triton kernels (lrq_deploy.plugins) run in Triton's interpreter. The
# variable must be set before anything (transformers, torch inductor) first imports Triton.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from lrq_deploy.config import CalibConfig, QuantConfig  # noqa: E402
from lrq_deploy.errors import LrqError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CalibConfig", "QuantConfig", "LrqError", "__version__"]
