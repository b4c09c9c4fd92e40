"""LLaMA family: Llama, Mistral, Qwen2 (grouped-query attention supported)."""

from __future__ import annotations

from lrq_deploy.models.base import RotationLayout, SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter


class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def attention_layout(self, model):
        from lrq_deploy.models.attention import rotary_attention_layout

        return rotary_attention_layout(self, model)

    def rotation_layout(self, model):
        _, head_dim = self.kv_cache_shape(model.config)
        return RotationLayout(
            embeddings="model.embed_tokens", final_norm="model.norm", head="lm_head",
            writers=("self_attn.o_proj", "mlp.down_proj"), value="self_attn.v_proj", out="self_attn.o_proj",
            head_dim=head_dim, online=("mlp.down_proj",),
        )

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
