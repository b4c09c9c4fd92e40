"""LLaVA-style multimodal models (transformers' LlavaForConditionalGeneration): a vision tower
and projector turn an image into embeddings placed at the <image> tokens of the prompt; the
language model (a LLaMA-family decoder) does the rest.

Calibration and quantization cover the language-model blocks, on image + text samples (the
image's tokens flow through the blocks as they do in use); the vision tower and projector stay
in full precision. The exported graph is the language model on `inputs_embeds` (image features
already merged), the part that dominates deployment cost."""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy import data
from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import ExportSpec, static_batches
from lrq_deploy.graph_io import BATCH_AXIS, SEQ_AXIS, GraphIO, TensorSpec
from lrq_deploy.models.hf import HFAdapter
from lrq_deploy.models.llama import LlamaAdapter

TEXT_TOKENS = 32  # text tokens after the image in every calibration / evaluation sample
EVAL_SAMPLES = 64


class LlavaAdapter(HFAdapter):
    family = "llava"
    model_types = ("llava",)
    auto_class = "AutoModelForImageTextToText"
    preprocessor_class = "AutoProcessor"
    task = "image_text_to_text"
    default_metric = "cosine"
    agreement_argmax = True  # next-token agreement
    text_adapter = LlamaAdapter()

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def blocks(self, model):
        return self.language_model(model).layers

    def smooth_groups(self, model):
        return self.text_adapter.groups_for(model.config.text_config)

    def load_pretrained(self, path, trust_remote_code):
        model, processor = super().load_pretrained(path, trust_remote_code)
        text_type = model.config.text_config.model_type
        if text_type not in self.text_adapter.model_types:
            raise LrqError(f"{path}: LLaVA with a {text_type!r} language model is not supported "
                           f"(supported: {', '.join(self.text_adapter.model_types)})")
        return model, processor

    def forward_for_capture(self, model, batch):
        ids, pixels = batch
        model(input_ids=ids, pixel_values=pixels, use_cache=False)

    def max_sequence_length(self, model):
        return model.config.text_config.max_position_embeddings

    # --- samples: one image, then TEXT_TOKENS of text ----------------------------------------
    def samples(self, processor, pictures: list, text: str, seed: int, text_tokens: int = TEXT_TOKENS):
        """[(input_ids [1, L], pixel_values [1, C, H, W])]: the processor's prompt for one image
        ("<image>\\n", image tokens expanded) followed by a window of text, all of one length."""
        image_token = getattr(processor, "image_token", "<image>")
        ids = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ids.numel() <= text_tokens:
            raise LrqError(f"the text has {ids.numel()} tokens; at least {text_tokens + 1} are needed")
        starts = torch.randint(0, ids.numel() - text_tokens, (len(pictures),), generator=torch.Generator().manual_seed(seed))
        out = []
        for picture, start in zip(pictures, starts.tolist()):
            prompt = processor(images=picture.convert("RGB"), text=f"{image_token}\n", return_tensors="pt")
            window = ids[start : start + text_tokens].unsqueeze(0)
            out.append((torch.cat([prompt["input_ids"], window], dim=1), prompt["pixel_values"]))
        return out

    def calibration_batches(self, source, calib_path, nsamples, seqlen, seed):
        text_tokens = TEXT_TOKENS if seqlen is None else seqlen
        pictures = (data.folder_pictures(calib_path, nsamples, seed) if calib_path is not None
                    else _sample(data.digits_pictures("train")[0], nsamples, seed))
        return self.samples(source.tokenizer, pictures, data.bundled_text("calib"), seed, text_tokens)

    def held_out(self, source, data_path, limit):
        pictures = (data.folder_pictures(data_path, limit or EVAL_SAMPLES) if data_path is not None
                    else data.digits_pictures("test")[0][: limit or EVAL_SAMPLES])
        return self.samples(source.tokenizer, pictures, data.bundled_text("test"), seed=1)

    def evaluate(self, model, source, data_path, limit, device, seq_len=None):
        return {}  # judged against the full-precision model's next-token logits (agreement_outputs)

    compares_outputs = True

    @torch.no_grad()
    def agreement_outputs(self, model, source, data_path, limit, device):
        """Next-token logits at the text positions of held-out image + text samples."""
        return [model(input_ids=ids.to(device), pixel_values=pixels.to(device), use_cache=False).logits[:, -TEXT_TOKENS:].cpu()
                for ids, pixels in self.held_out(source, data_path, limit)]

    # --- export: the language model on merged embeddings ----------------------------------
    def graph_io(self, model, with_past=False):
        if with_past:
            raise LrqError("--with-past is not supported for LLaVA yet; export the language model without it")
        text = model.config.text_config
        return GraphIO((TensorSpec("inputs_embeds", "float32", (BATCH_AXIS, SEQ_AXIS, text.hidden_size)),),
                       (TensorSpec("logits", "float32", (BATCH_AXIS, SEQ_AXIS, text.vocab_size)),))

    def export_spec(self, model, batch, seq_len, with_past):
        io = self.graph_io(model, with_past)
        static = batch is not None or seq_len is not None
        embeds = torch.randn(batch or 2, seq_len or 24, io.inputs[0].dims[2], generator=torch.Generator().manual_seed(0))
        shape = {0: torch.export.Dim(BATCH_AXIS, min=1, max=1024),
                 1: torch.export.Dim(SEQ_AXIS, min=2, max=self.max_sequence_length(model))}
        return ExportSpec(_LanguageModel(model, self), (embeds,), io.input_names, io.output_names,
                          None if static else (shape,))

    @torch.no_grad()
    def verification_set(self, source, data_path, limit, batch=None, seq_len=None):
        """inputs_embeds of held-out samples: token embeddings with the image features merged in."""
        captured = []
        handle = self.language_model(source.model).register_forward_pre_hook(
            lambda _m, args, kwargs: captured.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)
        try:
            for ids, pixels in self.held_out(source, data_path, limit or 16):
                source.model(input_ids=ids, pixel_values=pixels, use_cache=False)
        finally:
            handle.remove()
        embeds = torch.cat(captured)
        if seq_len is not None:
            if embeds.shape[1] < seq_len:
                raise LrqError(f"samples have {embeds.shape[1]} positions, fewer than the static --seq-len {seq_len}")
            embeds = embeds[:, :seq_len]
        return static_batches(embeds, batch, 4), None

    def metric_from_logits(self, inputs, logits, labels) -> dict:
        return {}  # logits compared directly (cosine, next-token agreement)


class _LanguageModel(nn.Module):
    """inputs_embeds -> logits through the language model and LM head."""

    def __init__(self, model: nn.Module, adapter: LlavaAdapter):
        super().__init__()
        self.model, self.decoder = model, adapter.language_model(model)

    def forward(self, inputs_embeds):
        hidden = self.decoder(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden)


def _sample(items: list, count: int, seed: int) -> list:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:count]
    return [items[i] for i in order.tolist()]
