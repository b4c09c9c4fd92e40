"""The quantized checkpoint: a directory with manifest.json, model.safetensors and what is
needed to rebuild the model (HF config + tokenizer, or timm.json).

Written atomically: everything goes to a hidden temporary directory next to the target,
which is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from torch import nn

from lrq_deploy.atomic import OutputKind, atomic_directory, check_output_dir, is_json_of
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.models import LoadedModel, adapter_for_family
from lrq_deploy.provenance import library_versions, sha256_of
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.kv_cache import quantize_kv_cache
from lrq_deploy.rotate import add_rotation_structure

FORMAT = "lrq-checkpoint"
FORMAT_VERSION = 3  # 2: manifest records size and sha256 of every file; 3: and the sha256 of its own fields
SELF_HASH = "manifest_sha256"
REQUIRED_KEYS = ("family", "task", "source", "quant", "calib", "quantized_modules")
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
OUTPUT = OutputKind("checkpoint", directory=True, recognise=lambda p: is_json_of(Path(p) / MANIFEST, "format", FORMAT))


def save_checkpoint(
    out: Path, source: LoadedModel, model: nn.Module, quantized: list[str],
    qconfig: QuantScheme, calib: dict, blocks: list[dict], force: bool = False, calib_data: str | None = None,
    rotation: dict | None = None, scheme_rules: list[dict] | None = None, scheme_search: dict | None = None,
) -> Path:
    """scheme_rules: the per-layer rules the schemes came from (quant/layer_schemes.py); the scheme of
    every quantized module that differs from `qconfig` is recorded from the module itself.
    scheme_search: the bit-budget search's record (calib/auto_scheme.py), with the rules as given."""
    from safetensors.torch import save_model

    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        extras = source.adapter.save_architecture(source, tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": source.adapter.family,
            "task": source.adapter.task,
            "source": source_reference(source.spec),
            "quant": qconfig.to_dict(),
            "calib": calib,
            "calib_data": calib_data,
            "quantized_modules": quantized,
            "blocks": blocks,
            "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extras,
        }
        if rotation is not None:
            manifest["rotation"] = rotation
        others = _other_schemes(model, quantized, qconfig)
        if scheme_rules or others:
            manifest[LAYER_SCHEMES] = {"rules": scheme_rules or [], "modules": others}
        if scheme_search is not None:
            manifest[LAYER_SCHEMES]["search"] = scheme_search
        manifest["files"] = file_records(tmp)
        manifest[SELF_HASH] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    atomic_directory(out, write)
    return out


LAYER_SCHEMES = "layer_schemes"


def _other_schemes(model: nn.Module, quantized: list[str], qconfig: QuantScheme) -> dict[str, dict]:
    """{module name: scheme fields} of the quantized modules whose scheme is not `qconfig`."""
    schemes = {name: model.get_submodule(name).config for name in quantized}
    return {name: scheme.to_dict() for name, scheme in schemes.items() if scheme != qconfig}


def module_scheme(manifest: dict, name: str) -> QuantScheme:
    """The scheme a checkpoint's manifest records for one of its quantized modules."""
    recorded = manifest.get(LAYER_SCHEMES, {}).get("modules", {}).get(name)
    return QuantScheme.from_dict(recorded if recorded is not None else manifest["quant"])


def source_reference(spec: str) -> str:
    from lrq_deploy.models import is_named_model

    return spec if is_named_model(spec) else str(Path(spec).resolve())


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LrqError(f"checkpoint {path} does not exist")
    file = path / MANIFEST
    if not file.is_file():
        raise LrqError(f"{path} is not an lrq checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LrqError(f"{file} is corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LrqError(f"{file} is not an lrq checkpoint manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LrqError(
            f"{path} has checkpoint format version {version}; this lrq-deploy reads up to {FORMAT_VERSION} (upgrade lrq-deploy)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise LrqError(f"{file} lacks {', '.join(missing)}; the checkpoint is damaged (calibrate it again)")
    quant = manifest["quant"]
    if not isinstance(quant, dict) or not {"wbits", "abits"} <= quant.keys() or not isinstance(manifest["quantized_modules"], list):
        raise LrqError(f"{file} is damaged (quant or quantized_modules malformed); calibrate it again")
    return manifest


def file_records(directory: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file in a checkpoint directory but the manifest."""
    return {
        file.relative_to(directory).as_posix(): {"bytes": file.stat().st_size, "sha256": sha256_of(file)}
        for file in sorted(directory.rglob("*")) if file.is_file() and file.name != MANIFEST
    }


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's fields (all but the digest itself), in one canonical JSON form."""
    fields = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_files(path: Path, manifest: dict) -> dict[str, str]:
    """Check every file the manifest covers, and (format 3) the manifest's own fields; {name: "ok" |
    "missing" | "size differs" | "sha256 differs" | "edited"}. Format-1 checkpoints recorded no hashes: {}."""
    results = {}
    if SELF_HASH in manifest or manifest.get("format_version", 0) >= 3:
        results[MANIFEST] = "ok" if manifest.get(SELF_HASH) == manifest_digest(manifest) else "edited"
    for name, record in manifest.get("files", {}).items():
        file = Path(path) / name
        if not file.is_file():
            results[name] = "missing"
        elif file.stat().st_size != record["bytes"]:
            results[name] = "size differs"
        elif sha256_of(file) != record["sha256"]:
            results[name] = "sha256 differs"
        else:
            results[name] = "ok"
    return results


def intact(path: Path, manifest: dict) -> bool:
    return all(verdict == "ok" for verdict in verify_files(path, manifest).values())


def check_files(path: Path, manifest: dict) -> None:
    """Refuse a checkpoint whose files do not match their manifest records, naming the first."""
    for name, verdict in verify_files(path, manifest).items():
        if verdict == "edited":
            raise LrqError(f"{Path(path) / MANIFEST} was edited after lrq wrote it (its fields no longer match their "
                           f"recorded sha256): the scheme or records it states cannot be trusted; calibrate again")
        if verdict != "ok":
            raise LrqError(f"{Path(path) / name} does not match {MANIFEST} ({verdict}): the file was changed, "
                           "truncated or damaged; restore it or calibrate again")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model with what its manifest says, parsed once: a quantized checkpoint, or a
    full-precision model (quant None) where a stage accepts one as its baseline."""

    loaded: LoadedModel
    quant: QuantScheme | None
    calib: dict | None  # how it was calibrated: method, its options, data settings (CalibConfig.to_dict)
    source: str
    quantized_modules: tuple[str, ...]
    manifest: dict

    @classmethod
    def full_precision(cls, loaded: LoadedModel) -> "Checkpoint":
        return cls(loaded, None, None, loaded.spec, (), {})

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def scheme(self) -> QuantScheme | None:
        """The QuantScheme (None for a full-precision model)."""
        return self.quant

    @property
    def schemes(self) -> list[QuantScheme]:
        """Every distinct scheme of the quantized modules, the checkpoint's own first when a module has it
        ([] for a baseline)."""
        if self.quant is None:
            return []
        return sorted({module_scheme(self.manifest, name) for name in self.quantized_modules} or {self.quant},
                      key=lambda s: (s != self.quant, s.wbits, s.name))

    @property
    def scheme_name(self) -> str:
        """"W4A16-g128" and the like; "W3A16 + W4A16-g128" for per-layer schemes; "full precision" for a baseline."""
        return " + ".join(s.name for s in self.schemes) if self.quant else "full precision"

    @property
    def method(self) -> str:
        return str(self.calib.get("method", "unknown")) if self.calib else "none"

    def full_precision_source(self, device="cpu") -> "Checkpoint":
        """The full-precision model this checkpoint was made from (its manifest's source), which a
        comparison loads; one line when a local source has moved since."""
        if Path(self.source).is_absolute() and not Path(self.source).exists():  # local sources are recorded absolute
            raise LrqError(f"the full-precision model this checkpoint was made from, {self.source}, is not there any "
                           "more (moved or deleted); the comparison loads it: put it back at that path")
        return load_source(self.source, device)


def load_checkpoint(path: Path, device="cpu") -> Checkpoint:
    """Rebuild the quantized model (reference torch backend) from a verified checkpoint directory."""
    path = Path(path)
    manifest = read_manifest(path)
    check_files(path, manifest)
    qconfig = QuantScheme.from_dict(manifest["quant"])
    adapter = adapter_for_family(manifest["family"])
    model, tokenizer = adapter.build_skeleton(path, manifest)
    if manifest.get("rotation"):
        add_rotation_structure(model, adapter.blocks(model), manifest["rotation"])
    if qconfig.kv_cache != "none":
        quantize_kv_cache(adapter, model, qconfig.kv_cache, qconfig.kv_rotate)
    for name in manifest["quantized_modules"]:
        _swap_in_shell(model, name, module_scheme(manifest, name))
    missing, unexpected = _load_weights(model, path / WEIGHTS)
    if missing or unexpected:
        raise LrqError(
            f"{path / WEIGHTS} does not match its manifest (missing {len(missing)}, unexpected {len(unexpected)} tensors)"
        )
    model.to(device).eval()
    loaded = LoadedModel(model=model, adapter=adapter, tokenizer=tokenizer, spec=str(path), extras=manifest)
    calib = manifest["calib"] if isinstance(manifest.get("calib"), dict) else None
    return Checkpoint(loaded, qconfig, calib, str(manifest["source"]), tuple(manifest["quantized_modules"]), manifest)


def load_source(spec, device="cpu") -> Checkpoint:
    """A quantized checkpoint directory, or a full-precision model where stages take one as their
    baseline: a named model (bundled, timm:NAME@WEIGHTS, pypi:...), or an HF / timm directory.
    Anything else is reported by the checkpoint loader (missing path, no manifest, ...)."""
    from lrq_deploy.models import is_named_model, load_model

    name, path = str(spec), Path(str(spec))
    full_precision = is_named_model(name) or (
        path.is_dir() and not (path / MANIFEST).exists()
        and ((path / "config.json").is_file() or (path / "timm.json").is_file()))
    return Checkpoint.full_precision(load_model(name, device)) if full_precision else load_checkpoint(path, device)


def _swap_in_shell(model: nn.Module, name: str, qconfig: QuantScheme) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child, None)
    if not isinstance(linear, nn.Linear):
        raise LrqError(f"checkpoint lists {name} as quantized, but the model has no linear there")
    setattr(parent, child, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, qconfig))


def _load_weights(model: nn.Module, file: Path) -> tuple[list, list]:
    """Load safetensors into the model; tied weights (stored once) resolve to their shared tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not file.is_file():
        raise LrqError(f"{file} is missing")
    try:
        return load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LrqError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
