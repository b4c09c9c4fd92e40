"""Qwen3: the LLaMA layout plus per-head RMSNorm of queries and keys before rotary."""

from __future__ import annotations

from lrq_deploy.models.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)

    def attention_layout(self, model):
        """None: onnxruntime's GroupQueryAttention has no q/k norm step (the graph keeps standard ops)."""
        return None
