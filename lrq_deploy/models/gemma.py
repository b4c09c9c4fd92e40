"""Gemma, Gemma 2 and Gemma 3 (text): RMSNorm that scales by (1 + weight), GeLU-tanh MLP,
Gemma 2/3's extra norms around attention and MLP (the MLP reads pre_feedforward_layernorm),
logit soft-capping, and sliding-window layers alternating with full ones (Gemma 3: with their
own rotary tables; each layer type gets its own mask and tables during calibration)."""

from __future__ import annotations

from lrq_deploy.models.base import SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter
from lrq_deploy.models.llama import decoder_rotation_layout

GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm multiplies by (1 + weight)


class GemmaAdapter(CausalLMAdapter):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")

    def attention_layout(self, model):
        """GroupQueryAttention with the per-layer sliding windows, Gemma 2's score soft-capping and
        Gemma 3's q/k norms (computed ahead of the node) and local / global rotary tables."""
        from lrq_deploy.models.attention import normed_projections, rotary_attention_layout, separate_projections

        modules = [block.self_attn for block in self.blocks(model)]
        project = normed_projections if hasattr(modules[0], "q_norm") else separate_projections
        windows = [getattr(module, "sliding_window", None) or -1 for module in modules]
        softcap = getattr(model.config, "attn_logit_softcapping", None) or 0.0
        return rotary_attention_layout(self, model, project, windows, softcap)

    def rotation_layout(self, model):
        """Gemma: its (1 + weight) norms fused like any RMSNorm. Gemma 2 / 3 normalise each sublayer's
        output before the residual add (post-norms): a per-channel weight there cannot move through
        the rotation, so they are not rotated."""
        if hasattr(self.blocks(model)[0], "post_feedforward_layernorm"):
            return None
        return decoder_rotation_layout(self.kv_cache_shape(model.config)[1], norm_offset=GEMMA_NORM_OFFSET)

    def smooth_groups(self, model):
        kv_heads, _ = self.kv_cache_shape(model.config)
        block = self.blocks(model)[0]
        mlp_norm = "pre_feedforward_layernorm" if hasattr(block, "pre_feedforward_layernorm") else "post_attention_layernorm"
        return [
            SmoothGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        norm_offset=GEMMA_NORM_OFFSET),
            SmoothGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",),
                        repeat=model.config.num_attention_heads // kv_heads, kv_heads=kv_heads),
            SmoothGroup(mlp_norm, "norm", ("mlp.gate_proj", "mlp.up_proj"), norm_offset=GEMMA_NORM_OFFSET),
            SmoothGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
        ]
