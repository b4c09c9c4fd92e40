"""What kind of artifact a path names: the one place that decides it (info, bench, decode ask)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from lrq_deploy.errors import LrqError
from lrq_deploy.provenance import sha256_of

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# a directory lrq export wrote around one graph (--genai) holds this record, naming the graph in "graph"
EXPORT_RECORD = "lrq-export.json"
# ... and under this key, every native library it carries: {file name: {"sha256", "bytes", ...}}
NATIVE_CODE = "native_code"
NATIVE_SUFFIXES = (".so", ".dylib", ".dll")


class Kind(str, Enum):
    CHECKPOINT = "checkpoint"  # a directory: an lrq checkpoint, or a full-precision model directory
    ONNX = "onnx"
    ENGINE = "engine"


def artifact_kind(path: Path, what: str = "target") -> Kind:
    """The kind of an existing artifact, from its type and name; one clear error otherwise."""
    return resolve_artifact(path, what)[0]


def resolve_artifact(path: Path, what: str = "target", check_native_code: bool = True) -> tuple[Kind, Path]:
    """(kind, the file or directory to open): an export directory stands for the graph it holds,
    once the native code it carries is checked against its record (check_native_code=False: the
    caller reports native_code_problems itself)."""
    path = Path(path)
    if not path.exists():
        raise LrqError(f"{what} {path} does not exist")
    graph = exported_graph(path)
    if graph is not None:
        problems = native_code_problems(path) if check_native_code else []
        if problems:
            raise LrqError(f"{path}: {problems[0]}; export it again (lrq info {path} shows the record)")
        return Kind.ONNX, graph
    return _kind_of(path), path


def exported_graph(directory: Path) -> Path | None:
    """The graph inside an lrq export directory (None: `directory` is none)."""
    record = Path(directory) / EXPORT_RECORD
    if not record.is_file():
        return None
    try:
        graph = directory / _export_record(Path(directory)).get("graph", "model.onnx")  # older records: model.onnx
    except TypeError:  # "graph" not a file name
        raise LrqError(f"{record} is not a readable export record") from None
    if not graph.is_file():
        raise LrqError(f"{directory} is an lrq export directory without its graph {graph.name}")
    return graph


def native_code(directory: Path) -> dict:
    """The native libraries an export directory's record names, each with "check": ok / missing / changed."""
    recorded = _export_record(Path(directory)).get(NATIVE_CODE, {})
    report = {}
    for name, entry in recorded.items():
        file = Path(directory) / name
        check = "missing" if not file.is_file() else "ok" if sha256_of(file) == entry.get("sha256") else "changed"
        report[name] = {**entry, "check": check}
    return report


def native_code_problems(directory: Path) -> list[str]:
    """Native libraries in an export directory that are missing, changed since export, or not recorded."""
    checked = native_code(directory)
    problems = [f"native library {name} is {'missing' if entry['check'] == 'missing' else 'changed since export'} "
                f"(recorded sha256 {str(entry.get('sha256'))[:16]}...)" for name, entry in checked.items() if entry["check"] != "ok"]
    problems += [f"{file.name} is native code the export did not record" for file in sorted(Path(directory).iterdir())
                 if file.suffix in NATIVE_SUFFIXES and file.name not in checked]
    return problems


def _export_record(directory: Path) -> dict:
    try:
        record = json.loads((directory / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        raise LrqError(f"{directory / EXPORT_RECORD} is not a readable export record") from None
    if not isinstance(record, dict):
        raise LrqError(f"{directory / EXPORT_RECORD} is not a readable export record")
    return record


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
