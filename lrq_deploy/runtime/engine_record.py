"""The build record written next to every engine (OUT.engine.json): what it was built with and
for, its sha256, and the graph it came from. `lrq info` shows it; the engine loader checks it
so that a mismatch is one clear line instead of a TensorRT deserialization error."""

from __future__ import annotations

import json
from pathlib import Path

from lrq_deploy.errors import LrqError

ENGINE_RECORD = "lrq-engine-record/1"


def record_path(engine: Path) -> Path:
    return Path(engine).with_name(Path(engine).name + ".json")


def build_record(engine: Path, onnx_path: Path, options, flavour, report: dict) -> dict:
    """What the engine is: flavour and version, targets, precision, source graph, hashes."""
    from lrq_deploy.provenance import library_versions, sha256_of

    return {
        "format": ENGINE_RECORD,
        "flavour": flavour.name,
        "tensorrt_version": flavour.version,
        "compute_capabilities": list(options.compute_capabilities) or [this_gpu() or "unknown"],
        "precision": options.precision,
        "profile": report.get("profile", {}),  # input name -> [min, opt, max] shapes
        "inputs": report.get("inputs", []),  # [name, dims] of the source graph; dynamic dims by axis name
        "plugins": report.get("plugins"),
        "layers": report.get("layers", {}),
        "bytes": engine.stat().st_size,
        "sha256": sha256_of(engine),
        "onnx": {"path": str(onnx_path.resolve()), "sha256": sha256_of(onnx_path),
                 "metadata": report.get("metadata", {})},
        "verify": report.get("verify"),
        "versions": library_versions(),
    }


def this_gpu() -> str | None:
    """Compute capability of the current CUDA device ("90"), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def read_build_record(engine: Path) -> dict | None:
    file = record_path(engine)
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LrqError(f"{file} (the engine's build record) is damaged ({exc}); rebuild the engine") from None
    if not isinstance(record, dict) or record.get("format") != ENGINE_RECORD:
        raise LrqError(f"{file} is not an lrq engine build record; rebuild the engine")
    return record


def check_build_record(engine: Path, record: dict, flavour) -> None:
    from lrq_deploy.provenance import sha256_of

    if record.get("flavour") != flavour.name or record.get("tensorrt_version") != flavour.version:
        raise LrqError(f"{engine} was built with {record.get('flavour')} {record.get('tensorrt_version')}; this machine has "
                       f"{flavour.name} {flavour.version}: rebuild it with lrq build-engine")
    if engine.stat().st_size != record.get("bytes") or sha256_of(engine) != record.get("sha256"):
        raise LrqError(f"{engine} does not match the sha256 in its build record (changed or damaged); rebuild it")
    targets = record.get("compute_capabilities") or []
    here = this_gpu()
    if here and "unknown" not in targets and here not in [str(t).upper().removeprefix("SM") for t in targets]:
        raise LrqError(f"{engine} was built for SM {', '.join(map(str, targets))}; this GPU is SM {here}: "
                       f"rebuild it here or with --sm {here}")
