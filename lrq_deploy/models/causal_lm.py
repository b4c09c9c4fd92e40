"""Shared machinery for Hugging Face causal LMs (LLaMA family, OPT)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lrq_deploy import data
from lrq_deploy.errors import LrqError
from lrq_deploy.eval.perplexity import perplexity, perplexity_from_logits, windows
from lrq_deploy.models.base import BlockInputs, ModelAdapter


class _StopForward(Exception):
    pass


class CausalLMAdapter(ModelAdapter):
    task = "causal_lm"
    default_metric = "ppl"
    eval_seqlen = 256

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def blocks(self, model):
        return self.decoder(model).layers

    def linear_names(self, block):
        return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]

    def capture_block_inputs(self, model, batches):
        """Run the model up to block 0 and record its input and keyword arguments.

        The keyword arguments (attention mask, rotary position embeddings, ...) are whatever
        the real model passes: replaying them keeps causal masking and RoPE exactly as in
        the model (the mask may be None when SDPA applies causality itself).
        """
        first = self.blocks(model)[0]
        hidden, captured = [], {}

        def hook(_module, args, kwargs):
            hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
            if not captured:
                captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _StopForward

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for ids in batches:
                    try:
                        model(input_ids=ids, use_cache=False)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        kwargs = {k: v for k, v in captured.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        kwargs["use_cache"] = False
        return BlockInputs(hidden=torch.cat(hidden), kwargs=kwargs)

    def calibration_batches(self, source, calib_path, nsamples, seqlen, seed):
        text = data.read_text(calib_path) if calib_path else data.bundled_text("calib")
        return data.token_windows(source.tokenizer, text, nsamples, seqlen, seed)

    def save_architecture(self, source, out_dir: Path) -> dict:
        source.model.config.save_pretrained(out_dir)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(out_dir)
        return {}

    def build_skeleton(self, ckpt_dir: Path, extras: dict):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(ckpt_dir)
            tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        except (OSError, ValueError) as exc:
            raise LrqError(f"{ckpt_dir}: cannot read model config/tokenizer ({_first_line(exc)})") from None
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model, tokenizer

    def evaluate(self, model, source, data_path, limit, device):
        ids = self._eval_ids(source, data_path)
        return {"ppl": perplexity(torch_logits(model, device), ids, self.eval_seqlen, max_windows=limit)}

    def _eval_ids(self, source, data_path) -> torch.Tensor:
        text = data.read_text(data_path) if data_path else data.bundled_text("test")
        return data.tokenize(source.tokenizer, text)

    # --- export -------------------------------------------------------------------------
    input_names = ("input_ids",)

    def graph_module(self, model):
        return _LogitsOnly(model)

    def example_inputs(self, model, batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)),)

    def dynamic_axes(self) -> dict[int, tuple[str, int, int]]:
        return {0: ("batch", 1, 1024), 1: ("seq", 2, 4096)}

    def verification_set(self, source, data_path, limit, seq_len):
        ids = windows(self._eval_ids(source, data_path), seq_len or self.eval_seqlen, limit or 16)
        return list(ids.split(4)), None

    def metric_from_logits(self, inputs, logits, labels) -> dict:
        return {"ppl": perplexity_from_logits(zip(inputs, logits))}


class _LogitsOnly(nn.Module):
    """input_ids -> logits, without a KV cache: the graph exported for prefill/scoring."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def torch_logits(model: nn.Module, device):
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits.cpu()

    return run


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
