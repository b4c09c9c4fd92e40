"""What every artifact records about itself: file hashes and the library versions that wrote it."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def library_versions(*extra: str) -> dict:
    """Versions of Python and the libraries an artifact depends on (and of `extra` packages)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("lrq-deploy", "torch", "transformers", "timm", "safetensors", *extra):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
