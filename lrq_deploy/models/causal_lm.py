"""Shared machinery for Hugging Face causal LMs (LLaMA family, OPT)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lrq_deploy import data
from lrq_deploy.errors import LrqError
from lrq_deploy.eval.perplexity import perplexity
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
        text = data.read_text(data_path) if data_path else data.bundled_text("test")
        ids = data.tokenize(source.tokenizer, text)
        return {"ppl": perplexity(model, ids, self.eval_seqlen, max_windows=limit, device=device)}


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
