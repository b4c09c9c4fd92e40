"""`lrq info`: what a checkpoint, ONNX graph or engine is, and whether it is intact.

Reads only metadata, hashes and the records written next to each artifact (manifest.json,
OUT.onnx.verify.json, OUT.engine.json); it never runs or unpickles the artifact.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lrq_deploy.provenance import sha256_of
from lrq_deploy.quant.kv_cache import DESCRIPTIONS as KV_DESCRIPTIONS


def describe(target: Path) -> dict:
    """A report: {"kind", "path", "intact": bool, "problems": [...], ...kind-specific fields}."""
    from lrq_deploy.artifacts import Kind, resolve_artifact

    describers = {Kind.CHECKPOINT: describe_checkpoint, Kind.ONNX: describe_onnx, Kind.ENGINE: describe_engine}
    kind, path = resolve_artifact(target, check_native_code=False)
    report = describers[kind](path)
    if path != Path(target):  # an export directory (--genai): the graph, and the native code beside it
        native = describe_native_code(Path(target))
        report["problems"] += native.pop("problems")
        report.update(native, intact=not report["problems"])
    return report


def describe_native_code(directory: Path) -> dict:
    """The native libraries an export directory carries (code, not data): each with its recorded
    sha256, what loads it and what it needs, checked against the file; problems for any that fail."""
    from lrq_deploy.artifacts import native_code, native_code_problems

    libraries = native_code(directory)
    found = {"export_directory": str(directory), "native_code": libraries}
    if libraries:
        from lrq_deploy.runtime.cpu_kernels import code_path

        found["cpu_kernel_code_here"] = code_path()
    return {**found, "problems": native_code_problems(directory)}


def describe_checkpoint(path: Path) -> dict:
    from lrq_deploy.checkpoint import FORMAT_VERSION, MANIFEST, SELF_HASH, read_manifest, verify_files
    from lrq_deploy.quant.scheme import QuantScheme

    manifest = read_manifest(path)
    files = verify_files(path, manifest)
    records = {**manifest.get("files", {}),  # the manifest's own record: its size and the digest of its fields
               MANIFEST: {"bytes": (Path(path) / MANIFEST).stat().st_size, "sha256": str(manifest.get(SELF_HASH, ""))}}
    problems = [f"{name}: {verdict}" for name, verdict in files.items() if verdict != "ok"]
    if not files:
        problems.append(f"format version {manifest['format_version']} records no hashes (version {FORMAT_VERSION} does)")
    blocks = manifest.get("blocks", [])
    scheme = QuantScheme.from_dict(manifest["quant"])
    return {
        "kind": "lrq checkpoint",
        "path": str(path),
        "format_version": manifest["format_version"],
        "family": manifest["family"],
        "task": manifest["task"],
        "scheme": scheme.name,
        "number_formats": {"weights": scheme.wformat if scheme.quantize_weights else "float",
                           "activations": scheme.aformat if scheme.quantize_activations else "float"},
        "symmetric_weights": bool(scheme.symmetric or scheme.float_format),
        "kv_cache": f"{scheme.kv_cache}: {KV_DESCRIPTIONS[scheme.kv_cache]}"
                    + ("; keys rotated by a Hadamard matrix before quantization" if scheme.kv_rotate else ""),
        "method": manifest["calib"].get("method"),
        "rotation": rotation_summary(manifest.get("rotation")),
        "layer_schemes": layer_scheme_summary(manifest),
        "source": manifest["source"],
        "quantized_linears": len(manifest["quantized_modules"]),
        "blocks": len(blocks),
        "worst_block_cosine": min((b["cosine"] for b in blocks if "cosine" in b), default=None),
        "largest_input_ratios": largest_input_ratios(blocks),
        "files": {name: {**records.get(name, {}), "check": verdict} for name, verdict in files.items()},
        "versions": manifest.get("versions", {}),
        "created": manifest.get("created"),
        "intact": not any(v != "ok" for v in files.values()),
        "problems": problems,
    }


def largest_input_ratios(blocks: list) -> str | None:
    """The linear inputs with the largest channel and token max / median ratios over the calibration
    set (calibration records them per block and linear): where smoothing or a rotation pays."""
    rows = [(ratios[kind], f"block {b.get('block')} {name}", kind) for b in blocks if isinstance(b, dict)
            for name, ratios in (b.get("input_ratios") or {}).items() for kind in ("channel", "token")]
    if not rows:
        return None
    parts = [max((r for r in rows if r[2] == kind), key=lambda r: r[0]) for kind in ("channel", "token")]
    return "; ".join(f"{kind} max/median {value:g} ({where})" for value, where, kind in parts)


def layer_scheme_summary(manifest: dict) -> str:
    """How many quantized modules each scheme covers, and the rules that chose them ("uniform" without rules)."""
    from lrq_deploy.checkpoint import LAYER_SCHEMES, module_scheme
    from lrq_deploy.quant.layer_schemes import SchemeRule, scheme_label

    record = manifest.get(LAYER_SCHEMES)
    if not isinstance(record, dict):
        return "uniform"
    counts = Counter(module_scheme(manifest, name).name for name in manifest["quantized_modules"])
    used = ", ".join(f"{label} x{count}" for label, count in counts.items())
    search = record.get("search")
    if isinstance(search, dict):
        given = len(search.get("given", {}).get("rules", []))
        return (used + f"; searched for {search.get('effective_bits')} bits per weight ({search.get('achieved_bits')} "
                f"reached) over {len(search.get('table', []))} linears" + (f", {given} rules given" if given else ""))
    rules = [SchemeRule.from_dict(r) for r in record.get("rules", [])]
    return used + ("; rules " + ", ".join(f"{r.pattern}={scheme_label(r.scheme)}" for r in rules) if rules else "")


def rotation_summary(record) -> str:
    """What --rotate folded and what runs online, in one line ("none" for an unrotated checkpoint)."""
    if not isinstance(record, dict):
        return "none"
    online = ", ".join(f"{name} ({' x '.join(map(str, sizes))})" for name, sizes in record.get("online", {}).items())
    return (f"{record.get('kind')} (seed {record.get('seed')}): R1 {record.get('r1')} wide and R2 per head "
            f"{record.get('r2')} folded; online before {online or 'nothing'}")


def describe_onnx(path: Path) -> dict:
    import onnx

    from lrq_deploy.engine.requirements import read_graph
    from lrq_deploy.export.graph import summarized_metadata

    model = read_graph(path)
    metadata = summarized_metadata(model)
    sha = sha256_of(path)
    report = {
        "kind": "ONNX graph",
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "operators": dict(Counter(_op_name(n) for n in model.graph.node).most_common(12)),
        "initializer_bytes": sum(_tensor_bytes(t) for t in model.graph.initializer),
        "lrq": {k.removeprefix("lrq."): v for k, v in metadata.items() if k.startswith("lrq.")},
        "problems": [],
    }
    from lrq_deploy.runtime.onnxrt import declare_onnxruntime_norm

    declare_onnxruntime_norm()  # graphs onnxruntime saved (--genai) hold its SimplifiedLayerNormalization
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        report["problems"].append(f"fails the ONNX checker: {str(exc).splitlines()[0]}")
    if not report["lrq"]:
        report["problems"].append("not written by lrq export (no lrq metadata)")
    data = path.with_name(path.name + ".data")
    report["external_data_bytes"] = data.stat().st_size if data.is_file() else 0
    report["verification"] = _sidecar(path.with_name(path.name + ".verify.json"), sha, report["problems"], data)
    report["intact"] = not report["problems"]
    return report


def describe_engine(path: Path) -> dict:
    from lrq_deploy.runtime.engine_record import read_build_record

    sha = sha256_of(path)
    record = read_build_record(path)
    problems = []
    if record is None:
        problems.append(f"no build record ({path.name}.json): not built by lrq build-engine, or the record was removed")
    elif record.get("sha256") != sha:
        problems.append("the engine does not match the sha256 in its build record (changed or damaged)")
    record = record or {}
    return {
        "kind": "TensorRT engine",
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha,
        "flavour": record.get("flavour"),
        "tensorrt_version": record.get("tensorrt_version"),
        "compute_capabilities": record.get("compute_capabilities"),
        "precision": record.get("precision"),
        "profile": record.get("profile"),
        "plugins": record.get("plugins"),
        "layers": record.get("layers"),
        "source_onnx": record.get("onnx"),
        "verification": record.get("verify"),
        "versions": record.get("versions"),
        "intact": not problems,
        "problems": problems,
    }


def _sidecar(file: Path, sha: str, problems: list, data: Path) -> dict | None:
    """The verification recorded at export, if it belongs to this very graph (and weights file)."""
    if not file.is_file():
        return None
    try:
        recorded = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        problems.append(f"{file.name} is damaged")
        return None
    if recorded.get("sha256") != sha:
        problems.append(f"{file.name} records another file's sha256 (the graph changed after export)")
        return None
    if "data_sha256" in recorded and (not data.is_file() or recorded["data_sha256"] != sha256_of(data)):
        problems.append(f"{data.name} is missing or changed since export")
        return None
    return recorded.get("verify")


def _value_info(value) -> dict:
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            if tensor.elem_type else "unknown", "dims": dims}


def _op_name(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain else node.op_type


def _tensor_bytes(tensor) -> int:
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    if tensor.raw_data:
        return len(tensor.raw_data)
    return onnx.numpy_helper.to_array(tensor).nbytes


def format_report(report: dict) -> str:
    """Aligned `key: value` lines; nested values as compact JSON."""
    lines = []
    for key, value in report.items():
        if key in ("problems", "files", "native_code"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        lines.append(f"{key.replace('_', ' '):<22}{text}")
    for name, record in report.get("files", {}).items():
        lines.append(f"{'file':<22}{name}  {record['bytes']} bytes  sha256 {record['sha256'][:16]}…  {record['check']}")
    for name, record in report.get("native_code", {}).items():
        lines.append(f"{'native code':<22}{name}  {record.get('bytes')} bytes  sha256 {record.get('sha256')}  "
                     f"{'intact' if record['check'] == 'ok' else 'NOT intact: ' + record['check']}")
        lines.append(f"{'':<22}loaded by {record.get('loaded_by')}; built for {record.get('machine')}, "
                     f"{record.get('needs')}")
    lines += [f"{'problem':<22}{problem}" for problem in report["problems"]]
    return "\n".join(lines)
