"""LLaMA family: Llama, Mistral, Qwen2 (grouped-query attention supported)."""

from __future__ import annotations

from lrq_deploy.models.base import SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter


class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")

    # rotary embeddings whose tables do not depend on the sequence (GroupQueryAttention reads fixed ones)
    STATIC_ROPE = ("default", "linear", "llama3", "yarn")

    def attention_layout(self, model):
        """Full rotate-half rotary from fixed tables, causal attention without a sliding window."""
        from lrq_deploy.models.attention import AttentionLayout, rotary_tables

        cfg = model.config
        rotary = getattr(self.decoder(model), "rotary_emb", None)
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if rotary is None or window or getattr(rotary, "rope_type", "default") not in self.STATIC_ROPE:
            return None
        kv_heads, head_dim = self.kv_cache_shape(cfg)
        modules = [block.self_attn for block in self.blocks(model)]
        cos, sin = rotary_tables(rotary, self.max_sequence_length(model), head_dim)
        return AttentionLayout(modules, cfg.num_attention_heads, kv_heads, head_dim, cos, sin, modules[0].scaling)

    def smooth_groups(self, model):
        return self.groups_for(model.config)

    def groups_for(self, cfg):
        """The smoothing table of a decoder layer with this config (also used inside LLaVA)."""
        kv_heads, _ = self.kv_cache_shape(cfg)
        return [
            SmoothGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup(
                "self_attn.v_proj", "linear", ("self_attn.o_proj",),
                repeat=cfg.num_attention_heads // kv_heads, kv_heads=kv_heads,
            ),
            SmoothGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
            SmoothGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
        ]
