"""What kind of artifact a path names: the one place that decides it (info, bench, decode ask)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from lrq_deploy.errors import LrqError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class Kind(str, Enum):
    CHECKPOINT = "checkpoint"  # a directory: an lrq checkpoint, or a full-precision model directory
    ONNX = "onnx"
    ENGINE = "engine"


def artifact_kind(path: Path, what: str = "target") -> Kind:
    """The kind of an existing artifact, from its type and name; one clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise LrqError(f"{what} {path} does not exist")
    if path.is_dir():
        return Kind.CHECKPOINT
    if path.suffix == ".onnx":
        return Kind.ONNX
    if path.suffix in ENGINE_SUFFIXES:
        return Kind.ENGINE
    raise LrqError(f"cannot tell what {path} is: name a checkpoint directory, an .onnx file or an "
                   f"{'/'.join(ENGINE_SUFFIXES)} engine file")
