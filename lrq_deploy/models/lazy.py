"""Big models in small memory: an HF model whose parameters stay on the meta device until a
block is needed, then are read from the safetensors shards (memory-mapped, only that block's
tensors). Calibration materialises one block at a time; quantized blocks keep only their packed
codes, so resident memory is the non-block parameters, one full-precision block and the
quantized blocks done so far."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lrq_deploy.errors import LrqError

INDEX = "model.safetensors.index.json"


class ShardedWeights:
    """Parameter name -> the safetensors file that holds it (one file, or an index of shards)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        if (directory / INDEX).is_file():
            mapping = json.loads((directory / INDEX).read_text()).get("weight_map", {})
            self.files = {name: directory / file for name, file in mapping.items()}
        else:
            from safetensors import safe_open

            single = directory / "model.safetensors"
            with safe_open(str(single), "pt") as handle:
                self.files = {name: single for name in handle.keys()}
        self.directory = directory

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise LrqError(f"{self.directory}: {missing[0]} is not in the safetensors shards "
                           "(--offload reads HF checkpoints by parameter name)")
        tensors = {}
        for file in sorted({self.files[n] for n in names}):
            with safe_open(str(file), "pt") as handle:
                for name in names:
                    if self.files[name] == file:
                        # a copy: get_tensor's result views the memory-mapped file, and one small
                        # surviving view (a norm weight) would keep the whole block's pages resident
                        tensors[name] = handle.get_tensor(name).to(torch.float32, copy=True)
        return tensors

    def materialize(self, model: nn.Module, module: nn.Module) -> None:
        """Read every meta parameter of `module` (a part of `model`) from the shards."""
        prefix = next((n for n, m in model.named_modules() if m is module), None)
        if prefix is None:
            raise LrqError("module to materialise is not part of the model")
        pending = [(n, p) for n, p in module.named_parameters() if p.is_meta]
        full = [f"{prefix}.{n}" if prefix else n for n, _ in pending]
        tensors = self.read(full)
        for (name, param), key in zip(pending, full):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            value = tensors[key]
            if not torch.isfinite(value).all():
                raise LrqError(f"{self.directory}: weight {key} contains NaN or inf values")
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory); buffers stay
    real (rotary tables and the like are computed, not stored)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def lazy_hf_model(path: Path, adapter, trust_remote_code: bool):
    """(model with meta blocks and real everything else, the shards to materialise blocks from)."""
    from transformers import AutoConfig

    from lrq_deploy.models.hf import no_init_weights

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with parameters_on_meta(), no_init_weights():
        model = adapter.from_config(config, trust_remote_code=trust_remote_code)
    weights = ShardedWeights(path)
    blocks = {id(p) for block in adapter.blocks(model) for p in block.parameters()}
    outside = [m for m in model.modules() if any(id(p) not in blocks for p in m.parameters(recurse=False))]
    for module in outside:
        _materialize_own(weights, model, module)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), weights


def _materialize_own(weights: ShardedWeights, model: nn.Module, module: nn.Module) -> None:
    """A module's own (non-recursive) meta parameters; tied ones absent from the shards stay for tie_weights."""
    prefix = next(n for n, m in model.named_modules() if m is module)
    for leaf, param in list(module._parameters.items()):
        if param is None or not param.is_meta:
            continue
        key = f"{prefix}.{leaf}" if prefix else leaf
        if key not in weights.files:
            continue  # e.g. lm_head.weight tied to the embeddings
        module._parameters[leaf] = nn.Parameter(weights.read([key])[key], requires_grad=param.requires_grad)
