"""Device parametrization: one test body for the CPU and for CUDA (skipped without a GPU)."""

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]
