"""Import Triton; without a CUDA device the kernels run in Triton's interpreter."""

from __future__ import annotations

import os


def load_triton():
    """(triton, triton.language). Sets TRITON_INTERPRET=1 when no CUDA device is present,
    which must happen before Triton is first imported."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton
        import triton.language as tl
    except ImportError:
        from lrq_deploy.errors import LrqError

        raise LrqError("the kernel backend needs Triton: pip install triton (it ships with CUDA builds of torch)") from None
    return triton, tl


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
