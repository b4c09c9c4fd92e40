"""OPT: LayerNorm with bias (so channel shifts fold), fused nothing, ReLU MLP."""

from __future__ import annotations

from lrq_deploy.models.base import RotationLayout, SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter


class OptAdapter(CausalLMAdapter):
    family = "opt"
    model_types = ("opt",)

    def decoder(self, model):
        return model.model.decoder

    def rotation_layout(self, model):
        """Pre-LN OPT with the embeddings as wide as the stream: LayerNorm turned RMS by centring the
        stream. Post-LN OPT (350m) normalises the residual itself, which no rotation passes."""
        cfg = model.config
        if not cfg.do_layer_norm_before or cfg.word_embed_proj_dim != cfg.hidden_size:
            return None
        decoder = "model.decoder"
        return RotationLayout(
            stream_tensors=(f"{decoder}.embed_tokens.weight", f"{decoder}.embed_positions.weight"),
            final_norm=f"{decoder}.final_layer_norm", head="lm_head", writers=("self_attn.out_proj", "fc2"),
            value="self_attn.v_proj", out="self_attn.out_proj", head_dim=cfg.hidden_size // cfg.num_attention_heads,
            online=("fc2",), centred=True,
        )

    def smooth_groups(self, model):
        return [
            SmoothGroup(
                "self_attn_layer_norm", "norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), shiftable=True,
            ),
            SmoothGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",), shiftable=True),
            SmoothGroup("final_layer_norm", "norm", ("fc1",), shiftable=True),
        ]
