"""Qwen3: the LLaMA layout plus per-head RMSNorm of queries and keys before rotary."""

from __future__ import annotations

from lrq_deploy.models.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)

    def attention_layout(self, model):
        """LLaMA's GroupQueryAttention layout, the q/k norms applied to the projections before the
        node (which then rotates them)."""
        from lrq_deploy.models.attention import head_normed_projections, rotary_attention_layout

        kv_heads, head_dim = self.kv_cache_shape(model.config)
        project = head_normed_projections(model.config.num_attention_heads, kv_heads, head_dim)
        return rotary_attention_layout(self, model, project)
