"""Reading tensors from safetensors files (never pickle), with one clear line for a damaged file."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.errors import LrqError


def read_safetensors(path: Path) -> dict:
    """{name: torch.Tensor} of a safetensors file; a corrupt or truncated one is an LrqError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LrqError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
