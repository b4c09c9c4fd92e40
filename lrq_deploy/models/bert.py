"""BERT-style encoders (post-LN), e.g. all-MiniLM-L6-v2: sentence embeddings by mean pooling.

Post-LN blocks normalize *after* the residual add, so a block's input feeds both the residual
and query/key/value: scaling it would change the residual stream, and intermediate.dense's
input (the attention LayerNorm's output) is on the residual too. The only exact fold is value
-> attention.output.dense (softmax rows sum to 1, so a per-channel scale and shift of the
values pass through attention unchanged); every linear still gets learned weight clipping."""

from __future__ import annotations

import re

import torch
from torch import nn

from lrq_deploy import data
from lrq_deploy.errors import LrqError
from lrq_deploy.graph_io import ATTENTION_MASK, BATCH_AXIS, GraphIO, SEQ_AXIS, TensorSpec
from lrq_deploy.models.base import ExportSpec, SmoothGroup
from lrq_deploy.models.hf import HFAdapter

EVAL_SENTENCES = 1000  # WikiText-2 test sentences compared by default
MAX_TOKENS = 128  # sentence length cap when embedding (all-MiniLM-L6-v2 was trained on 128)


class BertAdapter(HFAdapter):
    family = "bert"
    model_types = ("bert",)
    auto_class = "AutoModel"
    task = "sentence_embedding"
    default_metric = "cosine"
    calib_seqlen = 128

    def blocks(self, model):
        return model.encoder.layer

    def smooth_groups(self, model):
        return [SmoothGroup("attention.self.value", "linear", ("attention.output.dense",), shiftable=True)]

    def load_pretrained(self, path, trust_remote_code):
        model, tokenizer = super().load_pretrained(path, trust_remote_code)
        if model.config.is_decoder or getattr(model.config, "add_cross_attention", False):
            raise LrqError(f"{path}: only BERT encoders are supported (this config is a decoder)")
        return model, tokenizer

    def forward_for_capture(self, model, batch):
        model(input_ids=batch)

    def max_sequence_length(self, model):
        return model.config.max_position_embeddings

    def calibration_batches(self, source, calib_path, nsamples, seqlen, seed):
        """Windows of the text framed as sentences are ([CLS] tokens [SEP]), all one length, so
        no padding: the block's attention mask is the same for every sample."""
        seqlen = self.calib_seqlen if seqlen is None else seqlen
        if not 3 <= seqlen <= self.max_sequence_length(source.model):
            raise LrqError(f"--seq-len must lie in 3..{self.max_sequence_length(source.model)} for this model, got {seqlen}")
        tok = source.tokenizer
        text = data.read_text(calib_path) if calib_path else data.bundled_text("calib")
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ids.numel() <= seqlen:
            raise LrqError(f"calibration text has {ids.numel()} tokens; at least {seqlen - 1} are needed")
        starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=torch.Generator().manual_seed(seed))
        frame = lambda window: torch.cat([torch.tensor([tok.cls_token_id]), window, torch.tensor([tok.sep_token_id])])
        return [frame(ids[s : s + seqlen - 2]).unsqueeze(0) for s in starts.tolist()]

    def evaluate(self, model, source, data_path, limit, device, seq_len=None):
        return {}  # a sentence encoder is judged against its full-precision embeddings (agreement_outputs)

    compares_outputs = True

    @torch.no_grad()
    def agreement_outputs(self, model, source, data_path, limit, device):
        return [sentence_embedding(model, ids.to(device), mask.to(device)).cpu()
                for ids, mask in self.sentence_batches(source.tokenizer, data_path, limit or EVAL_SENTENCES)]

    def sentence_batches(self, tokenizer, data_path, count: int, batch: int = 64):
        text = data.read_text(data_path) if data_path else data.bundled_text("test")
        chosen = sentences(text)[:count]
        if not chosen:
            raise LrqError("the evaluation text holds no sentence of 5 words or more")
        out = []
        for start in range(0, len(chosen), batch):
            enc = tokenizer(chosen[start : start + batch], padding=True, truncation=True, max_length=MAX_TOKENS,
                            return_tensors="pt")
            out.append((enc["input_ids"], enc[ATTENTION_MASK]))
        return out

    # --- export -------------------------------------------------------------------------
    def graph_io(self, model, with_past=False):
        if with_past:
            raise LrqError("--with-past applies to causal language models, not to a sentence encoder")
        return GraphIO((TensorSpec("input_ids", "int64", (BATCH_AXIS, SEQ_AXIS)),
                        TensorSpec(ATTENTION_MASK, "int64", (BATCH_AXIS, SEQ_AXIS))),
                       (TensorSpec("sentence_embedding", "float32", (BATCH_AXIS, model.config.hidden_size)),))

    def export_spec(self, model, batch, seq_len, with_past):
        io = self.graph_io(model, with_past)
        static = batch is not None or seq_len is not None
        batch, seq_len = batch or 2, seq_len or 16
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, seq_len // 2 :] = 0  # trace with padding, so the mask is a real input of the graph
        shape = {0: torch.export.Dim(BATCH_AXIS, min=1, max=1024), 1: torch.export.Dim(SEQ_AXIS, min=2, max=self.max_sequence_length(model))}
        return ExportSpec(_SentenceEmbedding(model), (ids, mask), io.input_names, io.output_names,
                          None if static else (shape, shape))

    def verification_set(self, source, data_path, limit, batch=None, seq_len=None):
        pairs = self.sentence_batches(source.tokenizer, data_path, limit or 64, batch=batch or 16)
        if seq_len is not None:
            pairs = [_pad_to(ids, mask, seq_len, source.tokenizer.pad_token_id) for ids, mask in pairs]
        if batch is not None:
            pairs = [p for p in pairs if len(p[0]) == batch]
            if not pairs:
                raise LrqError(f"verification has fewer sentences than the static batch {batch}; raise --limit")
        return pairs, None

    def metric_from_logits(self, inputs, logits, labels) -> dict:
        return {}  # embeddings are compared directly (cosine), there is no task metric


def sentence_embedding(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over real tokens (sentence-transformers' mean pooling)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class _SentenceEmbedding(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return sentence_embedding(self.model, input_ids, attention_mask)


def sentences(text: str, min_words: int = 5) -> list[str]:
    """Sentences of WikiText-style text: headings (= ... =) dropped, lines split at full stops."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        out += [s.strip() + " ." for s in re.split(r"\s\.\s|\s\.$", line) if len(s.split()) >= min_words]
    return out


def _pad_to(ids, mask, seq_len, pad_id):
    if ids.shape[1] > seq_len:
        return ids[:, :seq_len], mask[:, :seq_len]
    extra = seq_len - ids.shape[1]
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id or 0), torch.nn.functional.pad(mask, (0, extra)))
