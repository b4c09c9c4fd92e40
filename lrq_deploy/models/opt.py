"""OPT: LayerNorm with bias (so channel shifts fold), fused nothing, ReLU MLP."""

from __future__ import annotations

from lrq_deploy.models.base import SmoothGroup
from lrq_deploy.models.causal_lm import CausalLMAdapter


class OptAdapter(CausalLMAdapter):
    family = "opt"
    model_types = ("opt",)

    def decoder(self, model):
        return model.model.decoder

    def smooth_groups(self, model):
        return [
            SmoothGroup(
                "self_attn_layer_norm", "norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), shiftable=True,
            ),
            SmoothGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",), shiftable=True),
            SmoothGroup("final_layer_norm", "norm", ("fc1",), shiftable=True),
        ]
