"""timm Vision Transformers (ViT / DeiT), image classification."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lrq_deploy import data
from lrq_deploy.errors import LrqError
from lrq_deploy.metrics.top1 import top1_accuracy, top1_from_logits
from lrq_deploy.graph_io import BATCH_AXIS, GraphIO, TensorSpec
from lrq_deploy.models.base import BlockInputs, ExportSpec, ModelAdapter, RotationLayout, SmoothGroup, static_batches


class VitAdapter(ModelAdapter):
    family = "vit"
    task = "image_classification"
    default_metric = "top1"
    serves = "timm VisionTransformer: ViT, DeiT, distilled DeiT"

    def blocks(self, model):
        return model.blocks

    def head(self, model):
        return ("head", model.head) if isinstance(getattr(model, "head", None), nn.Linear) else None

    def rotation_layout(self, model):
        """Pre-LN ViT / DeiT, LayerNorm turned RMS by centring the stream (patch embedding, class token
        and position table made zero-mean). Not: layer scales, register or distillation tokens (a
        second head), a norm after pooling."""
        identity = all(isinstance(getattr(model, n, nn.Identity()), nn.Identity) for n in ("norm_pre", "fc_norm"))
        plain = all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity) for b in model.blocks)
        if not (identity and plain and isinstance(model.norm, nn.LayerNorm)) or getattr(model, "reg_token", None) \
                is not None or getattr(model, "dist_token", None) is not None or self.head(model) is None:
            return None
        dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
        tensors = tuple(n for n in ("cls_token", "pos_embed") if getattr(model, n, None) is not None)
        return RotationLayout(
            final_norm="norm", head="head", writers=("attn.proj", "mlp.fc2"), value="attn.qkv", out="attn.proj",
            head_dim=dim // heads, online=("mlp.fc2",), centred=True, stream_tensors=tensors,
            input_writers=("patch_embed.proj",),
        )

    def smooth_groups(self, model):
        dim = model.embed_dim
        return [
            SmoothGroup("norm1", "norm", ("attn.qkv",), shiftable=True),
            SmoothGroup("attn.qkv", "linear", ("attn.proj",), rows=(2 * dim, 3 * dim), shiftable=True),
            SmoothGroup("norm2", "norm", ("mlp.fc1",), shiftable=True),
        ]

    def capture_block_inputs(self, model, batches):
        hidden = []
        handle = self.blocks(model)[0].register_forward_pre_hook(lambda _m, args: hidden.append(args[0].detach()))
        try:
            with torch.no_grad():
                for images in batches:
                    model(images)
        finally:
            handle.remove()
        return BlockInputs(hidden=torch.cat(hidden))

    def calibration_batches(self, source, calib_path, nsamples, seqlen, seed):
        if seqlen is not None:
            raise LrqError("--seq-len applies to language models; the ViT calibrates on whole images")
        if calib_path is not None:  # an image folder: a seeded sample of it
            images, _ = self.image_folder(source.model, calib_path, nsamples, seed)
            return list(images.split(32))
        images, _ = data.digits_split("train")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:nsamples]
        return list(images[order].split(32))

    def save_architecture(self, source, out_dir: Path) -> dict:
        spec = source.extras["timm"]
        (out_dir / "timm.json").write_text(json.dumps(spec, indent=2) + "\n")
        return {"timm": spec}

    def build_skeleton(self, ckpt_dir: Path, extras: dict):
        return create_timm_model(extras["timm"]), None

    def evaluate(self, model, source, data_path, limit, device, seq_len=None):
        if seq_len is not None:
            raise LrqError("--seq-len applies to language models, not to the ViT")
        if data_path is not None:
            images, labels = self.image_folder(model, data_path, limit)
        else:
            images, labels = data.digits_split("test")
        if limit:
            images, labels = images[:limit], labels[:limit]
        return {"top1": top1_accuracy(lambda x: model(x.to(device)).cpu(), images, labels)}

    # --- export -------------------------------------------------------------------------
    def graph_io(self, model, with_past=False):
        if with_past:
            raise LrqError("--with-past applies to causal language models, not to the ViT")
        size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        return GraphIO((TensorSpec("pixel_values", "float32", (BATCH_AXIS, *size)),),
                       (TensorSpec("logits", "float32", (BATCH_AXIS, model.num_classes)),))

    def export_spec(self, model, batch, seq_len, with_past):
        if seq_len is not None:
            raise LrqError("--seq-len applies to language models, not to the ViT")
        io = self.graph_io(model, with_past)
        images = torch.randn(batch or 2, *io.inputs[0].dims[1:], generator=torch.Generator().manual_seed(0))
        dynamic = None if batch else ({0: torch.export.Dim(BATCH_AXIS, min=1, max=4096)},)
        return ExportSpec(model, (images,), io.input_names, io.output_names, dynamic)

    def verification_set(self, source, data_path, limit, batch=None, seq_len=None):
        images, labels = (self.image_folder(source.model, data_path, limit) if data_path is not None
                          else data.digits_split("test"))
        if limit:
            images, labels = images[:limit], labels[:limit]
        return static_batches(images, batch, 128), static_batches(labels, batch, 128)

    def metric_from_logits(self, inputs, logits, labels) -> dict:
        return {"top1": top1_from_logits(logits, labels)}

    def image_folder(self, model, path, limit=None, seed=None):
        """An ImageFolder directory prepared for `model`: its input size and channels; one-channel
        models use mean = std = 0.5 (the bundled digits' convention), others the timm model's
        pretrained_cfg normalization (ImageNet's by default)."""
        channels = model.patch_embed.proj.in_channels
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = ((0.5,), (0.5,)) if channels == 1 else (cfg.get("mean", (0.485, 0.456, 0.406)),
                                                            cfg.get("std", (0.229, 0.224, 0.225)))
        return data.image_folder(Path(path), tuple(model.patch_embed.img_size), channels, mean, std, limit, seed)


# timm.create_model arguments that read files or fetch weights; lrq loads model.safetensors itself.
UNSAFE_TIMM_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create_timm_model(spec: dict) -> nn.Module:
    import timm

    if not isinstance(spec, dict) or not isinstance(spec.get("model_name"), str) or not isinstance(spec.get("kwargs", {}), dict):
        raise LrqError("timm.json must hold {\"model_name\": NAME, \"kwargs\": {...}}")
    kwargs = spec.get("kwargs", {})
    unsafe = [key for key in kwargs if key in UNSAFE_TIMM_KWARGS]
    if unsafe:
        raise LrqError(f"timm.json kwargs may not set {', '.join(unsafe)}: lrq reads the weights from model.safetensors")
    try:
        model = timm.create_model(spec["model_name"], pretrained=False, **kwargs)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise LrqError(f"cannot build timm model {spec.get('model_name')!r}: {exc}") from None
    if not isinstance(model, timm.models.vision_transformer.VisionTransformer):
        from lrq_deploy.models import supported_families

        raise LrqError(f"unsupported architecture: timm model {spec['model_name']!r} is a {type(model).__name__} "
                       f"(supported: {supported_families()})")
    return model
