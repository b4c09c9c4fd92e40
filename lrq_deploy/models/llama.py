"""LLaMA family: Llama, Mistral, Qwen2 (grouped-query attention supported)."""

from __future__ import annotations

from lrq_deploy.models.base import RotationLayout, SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter


def decoder_rotation_layout(head_dim: int, **changes) -> RotationLayout:
    """Where --rotate folds into a LLaMA-style decoder (model.embed_tokens, model.norm, lm_head; o_proj
    and down_proj write the stream, down_proj rotated online), with a family's `changes`."""
    return RotationLayout(**{
        "stream_tensors": ("model.embed_tokens.weight",), "final_norm": "model.norm", "head": "lm_head",
        "writers": ("self_attn.o_proj", "mlp.down_proj"), "value": "self_attn.v_proj", "out": "self_attn.o_proj",
        "head_dim": head_dim, "online": ("mlp.down_proj",), **changes})


class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def attention_layout(self, model):
        from lrq_deploy.models.attention import rotary_attention_layout

        return rotary_attention_layout(self, model)

    def rotation_layout(self, model):
        return decoder_rotation_layout(self.kv_cache_shape(model.config)[1])

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
