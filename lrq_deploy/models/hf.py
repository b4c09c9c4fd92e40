"""What every Hugging Face `transformers` family shares: the Auto class that loads it, the
architecture files a checkpoint keeps (config + tokenizer or processor), and block-0 input
capture that replays the model's own keyword arguments."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import BlockInputs, ModelAdapter


class _StopForward(Exception):
    pass


class HFAdapter(ModelAdapter):
    """A family loaded by a transformers Auto class; `model_types` are the config.json
    `model_type` values it serves."""

    model_types: tuple[str, ...] = ()
    auto_class = "AutoModelForCausalLM"
    preprocessor_class = "AutoTokenizer"  # tokenizer, or processor (text + images)

    @property
    def serves(self) -> str:
        return ", ".join(self.model_types)

    def head(self, model: nn.Module) -> tuple[str, nn.Linear] | None:
        """The output embeddings (lm_head) of a model with a head."""
        get = getattr(model, "get_output_embeddings", None)
        head = get() if get is not None else None
        if not isinstance(head, nn.Linear):
            return None
        return next(name for name, module in model.named_modules() if module is head), head

    def load_pretrained(self, path: Path, trust_remote_code: bool):
        """(model, tokenizer-or-processor) from an HF directory, weights from safetensors only."""
        import transformers

        model = getattr(transformers, self.auto_class).from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
        self.restructure(model)
        return model, self.load_preprocessor(path, trust_remote_code)

    def load_preprocessor(self, path: Path, trust_remote_code: bool = False):
        """The family's tokenizer or processor saved in `path`; a missing or damaged file is named."""
        import transformers

        try:
            preprocessor = getattr(transformers, self.preprocessor_class).from_pretrained(
                path, trust_remote_code=trust_remote_code)
        except Exception as exc:  # tokenizers raise many types (Exception from the Rust side among them)
            if not any((Path(path) / name).is_file() for name in PREPROCESSOR_FILES):
                raise LrqError(f"{path}: no {self.preprocessor_kind} files ({_preprocessor_files(path)}); copy the "
                               f"model's {self.preprocessor_kind} files into it") from None
            raise LrqError(f"{path}: cannot load its {self.preprocessor_kind} ({_preprocessor_files(path)}): "
                           f"{first_line(exc)}") from None
        if isinstance(preprocessor, bool) or preprocessor is None:  # transformers returns False when nothing is found
            raise LrqError(f"{path}: no {self.preprocessor_kind} files ({_preprocessor_files(path)})")
        return preprocessor

    @property
    def preprocessor_kind(self) -> str:
        return "processor" if "Processor" in self.preprocessor_class else "tokenizer"

    def from_config(self, config, trust_remote_code: bool = False) -> nn.Module:
        import transformers

        return getattr(transformers, self.auto_class).from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code)

    def save_architecture(self, source, out_dir: Path) -> dict:
        source.model.config.save_pretrained(out_dir)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(out_dir)
        return {}

    def build_skeleton(self, ckpt_dir: Path, extras: dict):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(ckpt_dir)
            preprocessor = self.load_preprocessor(ckpt_dir)
        except (OSError, ValueError) as exc:
            raise LrqError(f"{ckpt_dir}: cannot read model config/tokenizer ({first_line(exc)})") from None
        if config.model_type not in self.model_types:
            raise LrqError(f"{ckpt_dir}: manifest.json names family {self.family!r}, but its config.json is a "
                           f"{config.model_type!r} model")
        with no_init_weights():  # every weight comes from the checkpoint: random init would only cost time
            model = self.from_config(config)
        self.restructure(model)
        model.tie_weights()
        return model, preprocessor

    def capture_block_inputs(self, model, batches):
        blocks = self.blocks(model)
        run = lambda batch: self.forward_for_capture(model, batch)  # noqa: E731
        inputs = capture_first_block(blocks[0], run, batches)
        inputs.block_kwargs = kwargs_of_other_layer_types(model.config, blocks, run, batches[0])
        return inputs

    def forward_for_capture(self, model: nn.Module, batch) -> None:
        """Run the model on one calibration batch (it is stopped at block 0)."""
        model(input_ids=batch, use_cache=False)


def capture_first_block(first: nn.Module, run, batches) -> BlockInputs:
    """Run each batch up to `first` and record its input and keyword arguments.

    The keyword arguments (attention mask, rotary position embeddings, ...) are whatever the
    real model passes: replaying them keeps masking and RoPE exactly as in the model (the mask
    may be None when SDPA applies causality itself). They are taken from the first batch, so
    every calibration batch has the same shape and mask."""
    hidden, captured = [], {}

    def hook(_module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run(batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
    kwargs["use_cache"] = False
    return BlockInputs(hidden=torch.cat(hidden), kwargs=kwargs)


def kwargs_of_other_layer_types(config, blocks: nn.ModuleList, run, batch) -> dict[int, dict]:
    """{block index: keyword arguments} for blocks whose `config.layer_types` entry differs from
    block 0's (sliding-window and full attention get different masks, Gemma 3 different rotary
    tables). Each type's arguments come from one forward that reaches its first block through
    pass-through stand-ins for the blocks before it (nothing is computed, meta blocks included)."""
    types = list(getattr(config, "layer_types", None) or [])[: len(blocks)]
    by_type: dict[str, dict] = {}
    for index, layer_type in enumerate(types):
        if layer_type == types[0] or layer_type in by_type:
            continue
        originals = [blocks[i] for i in range(index)]
        for i in range(index):
            blocks[i] = _PassThrough()
        try:
            by_type[layer_type] = capture_first_block(blocks[index], run, [batch]).kwargs
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
    return {i: by_type[t] for i, t in enumerate(types) if t in by_type}


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                      "merges.txt", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")


def _preprocessor_files(path: Path) -> str:
    present = [name for name in PREPROCESSOR_FILES if (Path(path) / name).is_file()]
    return "present: " + ", ".join(present) if present else "none of " + ", ".join(PREPROCESSOR_FILES[:4]) + " is there"


def cache_argument(model: nn.Module, cache) -> dict:
    """The KV-cache keyword of the model's forward: `cache` (transformers >= 5.2x) or the earlier
    `past_key_values` (deprecated there, with a FutureWarning on every call)."""
    return {_cache_keyword(type(model)): cache}


@lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    """Read once per model class: decoding asks at every token."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def no_init_weights():
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights as context
    return context()


def first_line(exc: Exception) -> str:
    """The first line of an exception's message; a wrapper's cause when it only names a validator."""
    cause = exc.__cause__
    if cause is not None and type(exc).__name__.startswith("StrictDataclass"):
        exc = cause
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
