"""Qwen3: the LLaMA layout plus per-head RMSNorm of queries and keys before rotary."""

from __future__ import annotations

from lrq_deploy.models.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)

    def attention_layout(self, model):
        """LLaMA's GroupQueryAttention layout, the q/k norms applied to the projections before the
        node (which then rotates them)."""
        from lrq_deploy.models.attention import normed_projections, rotary_attention_layout

        return rotary_attention_layout(self, model, normed_projections)
