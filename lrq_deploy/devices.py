"""The one place a --device option becomes a torch device."""

from __future__ import annotations

from lrq_deploy.errors import LrqError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str):
    """auto -> cuda when a GPU is there, else cpu; cuda without a GPU is refused."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LrqError("--device cuda was requested but no CUDA device is available")
    if name not in DEVICES:
        raise LrqError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)
