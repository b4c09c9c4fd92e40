"""What kind of artifact a path names: the one place that decides it (info, bench, decode ask)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from lrq_deploy.errors import LrqError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# a directory lrq export wrote around one graph (--genai) holds this record, naming the graph in "graph"
EXPORT_RECORD = "lrq-export.json"


class Kind(str, Enum):
    CHECKPOINT = "checkpoint"  # a directory: an lrq checkpoint, or a full-precision model directory
    ONNX = "onnx"
    ENGINE = "engine"


def artifact_kind(path: Path, what: str = "target") -> Kind:
    """The kind of an existing artifact, from its type and name; one clear error otherwise."""
    return resolve_artifact(path, what)[0]


def resolve_artifact(path: Path, what: str = "target") -> tuple[Kind, Path]:
    """(kind, the file or directory to open): an export directory stands for the graph it holds."""
    path = Path(path)
    if not path.exists():
        raise LrqError(f"{what} {path} does not exist")
    graph = exported_graph(path)
    if graph is not None:
        return Kind.ONNX, graph
    return _kind_of(path), path


def exported_graph(directory: Path) -> Path | None:
    """The graph inside an lrq export directory (None: `directory` is none)."""
    record = Path(directory) / EXPORT_RECORD
    if not record.is_file():
        return None
    try:
        graph = directory / json.loads(record.read_text()).get("graph", "model.onnx")  # older records: model.onnx
    except (ValueError, AttributeError, TypeError):
        raise LrqError(f"{record} is not a readable export record") from None
    if not graph.is_file():
        raise LrqError(f"{directory} is an lrq export directory without its graph {graph.name}")
    return graph


def _kind_of(path: Path) -> Kind:
    if path.is_dir():
        return Kind.CHECKPOINT
    if path.suffix == ".onnx":
        return Kind.ONNX
    if path.suffix in ENGINE_SUFFIXES:
        if looks_like_onnx(path):
            raise LrqError(f"{path} is an ONNX graph named like an engine; rename it to .onnx "
                           "(lrq build-engine makes an engine from it)")
        return Kind.ENGINE
    if looks_like_onnx(path):
        raise LrqError(f"{path} looks like an ONNX graph; name it .onnx")
    raise LrqError(f"cannot tell what {path} is: name a checkpoint directory, an .onnx file or an "
                   f"{'/'.join(ENGINE_SUFFIXES)} engine file")


# ModelProto's first fields as protobuf writes them: ir_version (field 1, varint), then a string
# or message field (producer_name 2, producer_version 3, domain 4, doc_string 6, graph 7, opset_import 8)
# or model_version (5, varint).
_ONNX_SECOND_FIELD = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42}


def looks_like_onnx(path: Path) -> bool:
    """Whether a file starts as a serialized ONNX ModelProto does (16 bytes read, not parsed)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELD
