"""Phi-3: the LLaMA layout with q/k/v fused into one qkv_proj and gate/up into one gate_up_proj
(grouped-query attention supported)."""

from __future__ import annotations

from lrq_deploy.models.base import SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter
from lrq_deploy.models.llama import decoder_rotation_layout


class Phi3Adapter(CausalLMAdapter):
    family = "phi3"
    model_types = ("phi3",)

    def attention_layout(self, model):
        """LLaMA's GroupQueryAttention layout, q, k and v split from the one qkv_proj (the export
        then hands the node the packed projection itself: export/attention.py pack_qkv)."""
        from lrq_deploy.models.attention import rotary_attention_layout

        kv_heads, head_dim = self.kv_cache_shape(model.config)
        sizes = [model.config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        return rotary_attention_layout(self, model, lambda module, hidden: module.qkv_proj(hidden).split(sizes, dim=-1))

    def rotation_layout(self, model):
        """LLaMA's, R2 on the value rows of the fused qkv_proj (its smoothing group's rows)."""
        return decoder_rotation_layout(self.kv_cache_shape(model.config)[1], value="self_attn.qkv_proj")

    def smooth_groups(self, model):
        cfg = model.config
        kv_heads, head_dim = self.kv_cache_shape(cfg)
        q_rows, kv_rows, inner = cfg.num_attention_heads * head_dim, kv_heads * head_dim, cfg.intermediate_size
        return [
            SmoothGroup("input_layernorm", "norm", ("self_attn.qkv_proj",)),
            # the value rows of the fused projection feed o_proj (each kv head repeated for its query heads)
            SmoothGroup("self_attn.qkv_proj", "linear", ("self_attn.o_proj",), repeat=cfg.num_attention_heads // kv_heads,
                        kv_heads=kv_heads, rows=(q_rows + kv_rows, q_rows + 2 * kv_rows)),
            SmoothGroup("post_attention_layernorm", "norm", ("mlp.gate_up_proj",)),
            # gate_up_proj's output is [gate, up]; down_proj reads up * act(gate): the up rows absorb
            SmoothGroup("mlp.gate_up_proj", "linear", ("mlp.down_proj",), rows=(inner, 2 * inner)),
        ]
