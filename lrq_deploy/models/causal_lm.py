"""Shared machinery for Hugging Face causal LMs (LLaMA family, OPT)."""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy import data
from lrq_deploy.errors import LrqError
from lrq_deploy.metrics.perplexity import perplexity, perplexity_from_logits, windows
from lrq_deploy.graph_io import BATCH_AXIS, GraphIO, PAST_AXIS, PAST_PREFIX, PRESENT_PREFIX, SEQ_AXIS, TensorSpec
from lrq_deploy.models.base import ExportSpec, static_batches
from lrq_deploy.models.hf import HFAdapter, cache_argument, output_cache
from lrq_deploy.quant.kv_cache import (
    cache_format, dequantize_kv, kv_quantizers, pack_stored, recording_stored_forms, stored_specs, unpack_stored,
)


class CausalLMAdapter(HFAdapter):
    task = "causal_lm"
    default_metric = "ppl"
    eval_seqlen = 256

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def blocks(self, model):
        return self.decoder(model).layers

    def calibration_batches(self, source, calib_path, nsamples, seqlen, seed):
        seqlen = self.check_seq_len(source.model, seqlen, "--seq-len")
        text = data.read_text(calib_path) if calib_path else data.bundled_text("calib")
        return data.token_windows(source.tokenizer, text, nsamples, seqlen, seed)

    def max_sequence_length(self, model) -> int:
        return getattr(model.config, "max_position_embeddings", None) or 1 << 20

    def cached_attention(self, model):
        modules = [block.self_attn for block in self.blocks(model)]
        return modules if all(hasattr(m, "layer_idx") for m in modules) else None

    def check_seq_len(self, model, seq_len: int | None, option: str) -> int:
        """A sequence length the model can run (None: the default window), or one clear error."""
        window = self.eval_seqlen if seq_len is None else seq_len
        longest = self.max_sequence_length(model)
        if not 2 <= window <= longest:
            raise LrqError(f"{option} must lie in 2..{longest} for this model, got {window}")
        return window

    def evaluate(self, model, source, data_path, limit, device, seq_len=None):
        window = self.check_seq_len(model, seq_len, "--seq-len")
        ids = self._eval_ids(source, data_path)
        if ids.numel() < window:
            raise LrqError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window}; "
                           "give a longer --data file or a smaller --seq-len")
        return {"ppl": perplexity(torch_logits(model, device), ids, window, max_windows=limit, progress=True)}

    def _eval_ids(self, source, data_path) -> torch.Tensor:
        text = data.read_text(data_path) if data_path else data.bundled_text("test")
        return data.tokenize(source.tokenizer, text)

    # --- export -------------------------------------------------------------------------
    def graph_io(self, model, with_past=False):
        logits = TensorSpec("logits", "float32", (BATCH_AXIS, SEQ_AXIS, model.config.vocab_size))
        ids = TensorSpec("input_ids", "int64", (BATCH_AXIS, SEQ_AXIS))
        if not with_past:
            return GraphIO((ids,), (logits,))
        kv_heads, head_dim = self.kv_cache_shape(model.config)
        fmt = cache_format(model)
        parts = stored_specs(fmt, head_dim) if fmt != "none" else [("", "float32", head_dim)]
        names = [(f"{i}.{kind}{suffix}", dtype, width) for i in range(model.config.num_hidden_layers)
                 for kind in ("key", "value") for suffix, dtype, width in parts]
        past = tuple(TensorSpec(PAST_PREFIX + n, dtype, (BATCH_AXIS, kv_heads, PAST_AXIS, width)) for n, dtype, width in names)
        present = tuple(TensorSpec(PRESENT_PREFIX + n, dtype, (BATCH_AXIS, kv_heads, "present", width))
                        for n, dtype, width in names)
        return GraphIO((ids, *past), (logits, *present), kv_cache=True)

    def export_spec(self, model, batch, seq_len, with_past):
        if seq_len is not None:
            self.check_seq_len(model, seq_len, "--seq-len")
        io = self.graph_io(model, with_past)
        static = batch is not None or seq_len is not None
        batch, seq_len = batch or (1 if static else 2), seq_len or (256 if static else 32)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen)
        batch_dim = torch.export.Dim(BATCH_AXIS, min=1, max=1024)
        seq_dim = torch.export.Dim(SEQ_AXIS, min=1 if with_past else 2, max=4096)
        ids_shape = {0: batch_dim, 1: seq_dim}
        if not with_past:
            return ExportSpec(_LogitsOnly(model), (ids,), io.input_names, io.output_names, None if static else (ids_shape,))
        past = tuple(_example_past(t, batch, gen) for t in io.inputs[1:])
        past_dim = torch.export.Dim(PAST_AXIS, min=1, max=8192)
        dynamic = (ids_shape, tuple({0: batch_dim, 2: past_dim} for _ in past))
        return ExportSpec(_WithPast(model), (ids, past), io.input_names, io.output_names, dynamic)

    def kv_cache_shape(self, config) -> tuple[int, int]:
        """(key/value heads, head dim) of the KV cache."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return kv_heads, head_dim

    def verification_set(self, source, data_path, limit, batch=None, seq_len=None):
        window = self.check_seq_len(source.model, seq_len, "--seq-len")
        ids = windows(self._eval_ids(source, data_path), window, limit or 16)
        return static_batches(ids, batch, 4), None

    def metric_from_logits(self, inputs, logits, labels) -> dict:
        return {"ppl": perplexity_from_logits(zip(inputs, logits))}


def _example_past(spec: TensorSpec, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Three tokens of cache for the trace: random floats, or codes and scales of the stored form."""
    shape = (batch, spec.dims[1], 3, spec.dims[3])
    if spec.dtype == "uint8":
        return torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    return torch.rand(shape, generator=gen) if spec.name.endswith("_scale") else torch.randn(shape, generator=gen)


class _LogitsOnly(nn.Module):
    """input_ids -> logits, without a KV cache: the graph for scoring and benchmarks of prefill."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class _WithPast(nn.Module):
    """(input_ids, past keys/values) -> (logits, present keys/values).

    One graph serves prefill (past length 0) and decode (new tokens appended to the cache). Every
    layer's cache keeps every token (sliding-window layers included: their window is applied by
    the mask), so all present outputs share one length axis.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past):
        from transformers import DynamicCache

        fmt = cache_format(self.model)
        if fmt != "none":
            return self._quantized_cache(input_ids, past, fmt)
        cache = DynamicCache()  # not from the config: that one crops sliding-window layers to the window
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, use_cache=True, **cache_argument(self.model, cache))
        present = []
        for layer in output_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    def _quantized_cache(self, input_ids, past, fmt):
        """The cache kept as its stored form (quant/kv_cache.py): the past is dequantized for
        attention, each new token quantized once and its codes and scales appended to the past's."""
        from transformers import DynamicCache

        parts = len(stored_specs(fmt, 2))
        layers = [past[i:i + 2 * parts] for i in range(0, len(past), 2 * parts)]
        cache = DynamicCache()
        quantizers = kv_quantizers(self.model)
        for index, (stored, quantizer) in enumerate(zip(layers, quantizers)):
            keys, values = (dequantize_kv(unpack_stored(stored[j:j + parts], fmt, getattr(quantizer, scale, None)), fmt)
                            for j, scale in ((0, "k_scale"), (parts, "v_scale")))
            cache.update(quantizer.rotate(keys), values, index)  # rotated keys (--kv-rotate) back to the model's
        with recording_stored_forms(self.model) as quantizers:
            for stored, quantizer in zip(layers, quantizers):
                quantizer.stored_past, quantizer.stored_present = stored, None
            out = self.model(input_ids=input_ids, use_cache=True, **cache_argument(self.model, cache))
            present = []
            for stored, quantizer in zip(layers, quantizers):
                if quantizer.stored_present is not None:  # appended by an attention that reads the stored cache
                    present += quantizer.stored_present
                    continue
                new = [pack_stored(form, fmt) for form in quantizer.recorded[-1]]  # keys, values of the new tokens
                present += [torch.cat([old, part], 2) for old, part in zip(stored, (*new[0], *new[1]))]
            for quantizer in quantizers:
                quantizer.stored_past = quantizer.stored_present = None
        return (out.logits, *present)


def torch_logits(model: nn.Module, device):
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits.cpu()

    return run
