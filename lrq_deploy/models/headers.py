"""Checking a model's weights against its config before loading them: the safetensors headers
give every tensor's name, dtype and shape without reading the data, and a model built on the
meta device from the config gives what the family expects. Mismatches are named field by field
instead of surfacing later as a loader's report, random-initialised blocks or integer weights
calibrated as floats."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lrq_deploy.errors import LrqError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
INTEGER_DTYPES = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorHeader:
    dtype: str
    shape: tuple[int, ...]
    file: str


def read_headers(directory: Path) -> dict[str, TensorHeader]:
    """{tensor name: dtype, shape, file} of an HF directory's safetensors weights (one file or an index of shards)."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise LrqError(f"{directory / INDEX} is not a safetensors index (no weight_map)") from None
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    headers = {}
    for name in files:
        headers.update(read_file_header(directory / name))
    return headers


def read_file_header(path: Path) -> dict[str, TensorHeader]:
    """One safetensors file's header: the 8-byte length, then JSON (read without the data)."""
    if not path.is_file():
        raise LrqError(f"weights file {path} does not exist (named by the safetensors index)")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length <= 0 or length > size - 8:
            raise LrqError(f"{path} is corrupt or truncated (not a safetensors file: bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LrqError(f"{path} is corrupt or truncated (its safetensors header is not JSON)") from None
    if not isinstance(header, dict):
        raise LrqError(f"{path} is corrupt (its safetensors header is not a JSON object)")
    tensors, data_bytes = {}, size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (_begin, end) = str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LrqError(f"{path} is corrupt (header entry {name!r} lacks dtype/shape/data_offsets)") from None
        if end > data_bytes:
            raise LrqError(f"{path} is truncated: tensor {name} ends at byte {end} of {data_bytes} data bytes")
        tensors[name] = TensorHeader(dtype, shape, path.name)
    return tensors


SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def _missing_fields(config: Path) -> str:
    """'; it has no hidden_size ...' when the config lacks a field transformers then fills with its default."""
    try:
        given = json.loads(config.read_text())
    except (OSError, ValueError):
        return ""
    missing = [f for f in SHAPE_FIELDS if isinstance(given, dict) and f not in given and "text_config" not in given]
    return f"; it has no {', '.join(missing)}, so transformers' default was used" if missing else ""


def check_weights_match_config(path: Path, adapter, spec: str, trust_remote_code: bool = False) -> None:
    """Refuse, in one line naming the field, weights that do not fit the config: a different
    layer count, a parameter of another shape, integer-typed parameters."""
    from transformers import AutoConfig

    import torch

    from lrq_deploy.models.hf import first_line, no_init_weights

    from huggingface_hub.errors import StrictDataclassError

    headers = read_headers(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:  # the last: config validators
        raise LrqError(f"{path / 'config.json'} is not a usable {adapter.family} config ({first_line(exc)})"
                       f"{_missing_fields(path / 'config.json')}") from None
    try:
        with torch.device("meta"), no_init_weights():
            model = adapter.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise LrqError(f"{path / 'config.json'} does not describe a buildable {adapter.family} model "
                       f"({first_line(exc)})") from None
    expected = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    found = {name: _lookup(headers, name, model) for name in expected}
    _check_layers(adapter, model, found, headers, spec)
    for name, header in found.items():
        if header is None:
            continue
        if header.dtype not in FLOAT_DTYPES:
            raise LrqError(f"{spec}: weight {name} is stored as {header.dtype} in {header.file}; lrq quantizes "
                           "floating-point weights (is this model already quantized?)")
        if header.shape != expected[name]:
            raise LrqError(f"{spec}: weight {name} has shape {list(header.shape)} in {header.file}, but config.json "
                           f"describes {list(expected[name])}: config.json and the weights are of different models"
                           f"{_missing_fields(path / 'config.json')}")


def _lookup(headers: dict[str, TensorHeader], name: str, model) -> TensorHeader | None:
    """A parameter's header under its own name or with / without the base-model prefix (how HF
    saves a bare model and loads it into a model with a head, and back)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    return next((headers[c] for c in candidates if c in headers), None)


def _check_layers(adapter, model, found: dict, headers: dict, spec: str) -> None:
    """Blocks whose parameters are all absent while block 0's are present: the config claims
    more layers than the weights hold (loading would initialise those blocks at random)."""
    blocks = list(adapter.blocks(model))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    present = [any(found.get(names.get(id(p))) is not None for p in block.parameters()) for block in blocks]
    if not present or not present[0]:
        return
    absent = [i for i, here in enumerate(present) if not here]
    if absent:
        held = _layers_in_weights(headers, names[id(next(blocks[0].parameters()))])
        holds = f"the weights hold {held}" if held is not None else f"block {absent[0]} is missing from the weights"
        raise LrqError(f"{spec}: config.json describes {len(blocks)} layers but {holds}; "
                       "config.json and the weights are of different models")


def _layers_in_weights(headers: dict, block0_param: str) -> int | None:
    """How many numbered blocks the weights hold, from block 0's parameter name (model.layers.0.x)."""
    container = block0_param.partition(".0.")[0].rpartition(".")[2]
    if not container:
        return None
    pattern = re.compile(r"(?:^|\.)" + re.escape(container) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for key in headers for m in [pattern.search(key)] if m}
    return max(indices) + 1 if indices else None


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def header_bytes(headers: dict[str, TensorHeader], dtypes: set[str] | None = None) -> int:
    """Bytes of the tensors in `headers` (of the given dtypes only, when named)."""
    return sum(math.prod(h.shape) * DTYPE_BYTES.get(h.dtype, 4) for h in headers.values()
               if dtypes is None or h.dtype in dtypes)


def weight_elements(spec: str) -> int | None:
    """How many weight elements a model spec's safetensors hold (from the headers; None when the
    spec is not a local model whose weights can be read, which the loader then reports)."""
    from lrq_deploy.models.specs import BUNDLED, TIMM_PREFIX, is_named_model, model_path

    try:
        if spec.startswith(TIMM_PREFIX):
            files = [Path(spec.partition("@")[2])]
            headers = read_file_header(files[0]) if files[0].is_file() else {}
        else:
            path = BUNDLED.get(spec) or (None if is_named_model(spec) else model_path(spec))
            if path is None or not path.is_dir():
                return None
            headers = read_headers(path) if (path / "config.json").is_file() else (
                read_file_header(path / "model.safetensors") if (path / "model.safetensors").is_file() else {})
    except LrqError:
        return None  # a damaged file is reported by the loader, with the model's context
    return sum(math.prod(h.shape) for h in headers.values()) or None
