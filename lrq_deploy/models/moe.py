"""Mixtures of experts with Mixtral's layout (Mixtral, Qwen3-MoE): a router (`mlp.gate`) picks the
top-k experts of each token; the experts' weights are stored fused as 3-D tensors.

lrq quantizes linears, so each block's experts become `RoutedExperts`: one gate_up_proj / down_proj
nn.Linear pair per expert, computing what the fused module computes.
- Calibration statistics and GPTQ Hessians of an expert come from the tokens routed to it. An
  expert routed fewer than MIN_ROUTED_TOKENS tokens of a batch runs on all of the batch's tokens
  instead, with routing weight 0 for those not routed to it: its output contribution is unchanged,
  and its statistics are never empty (rare experts are calibrated on the router's whole input).
- Smoothing: the norm before the experts feeds the router and every expert's gate_up_proj (one
  scale for all; the router absorbs it and stays full precision); each expert's up rows feed its
  own down_proj.
- Export traces the dense form: every expert on every token, weighted by the routing weights
  (zero where not routed): standard ONNX ops, no data-dependent shapes."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import SmoothGroup
from lrq_deploy.models.llama import LlamaAdapter

MIN_ROUTED_TOKENS = 8


class Expert(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False, device=gate_up.device,
                                      dtype=gate_up.dtype)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, device=down.device, dtype=down.dtype)
        with torch.no_grad():
            if not gate_up.is_meta:
                self.gate_up_proj.weight.copy_(gate_up)
                self.down_proj.weight.copy_(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class RoutedExperts(nn.ModuleList):
    """The experts of one block as linears (mlp.experts.E.gate_up_proj / down_proj); called as the
    fused module is: (tokens, top-k expert indices, top-k weights) -> the weighted sum of the
    chosen experts' outputs."""

    def __init__(self, fused: nn.Module):
        super().__init__(Expert(fused.gate_up_proj[e], fused.down_proj[e], fused.act_fn)
                         for e in range(fused.gate_up_proj.shape[0]))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros(hidden.shape[0], len(self), dtype=top_k_weights.dtype, device=hidden.device)
        weights = weights.scatter(1, top_k_index, top_k_weights).to(hidden.dtype)  # 0 where not routed
        dense = torch.compiler.is_exporting()  # a traced graph has no data-dependent row selection
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            rows = None if dense else weights[:, e].nonzero().flatten()
            if rows is None or len(rows) < MIN_ROUTED_TOKENS:  # every token, weight 0 where not routed
                out = out + expert(hidden) * weights[:, e, None]
            else:
                out = out.index_add(0, rows, expert(hidden[rows]) * weights[rows, e, None])
        return out


class MoeAdapter(LlamaAdapter):
    family = "moe"
    model_types = ("mixtral", "qwen3_moe")
    restructures = True

    def restructure(self, model: nn.Module) -> None:
        """Every block's fused experts as RoutedExperts (in place; meta tensors stay meta)."""
        for index, block in enumerate(self.blocks(model)):
            mlp = block.mlp
            if not hasattr(mlp, "experts") or not hasattr(mlp, "gate"):
                raise LrqError(f"block {index} has a dense MLP: models mixing dense and expert layers are not served yet")
            if not isinstance(mlp.experts, RoutedExperts):
                mlp.experts = RoutedExperts(mlp.experts)

    def attention_layout(self, model):
        from lrq_deploy.models.attention import normed_projections, rotary_attention_layout, separate_projections

        normed = hasattr(self.blocks(model)[0].self_attn, "q_norm")  # Qwen3-MoE: per-head q/k norms, as Qwen3
        return rotary_attention_layout(self, model, normed_projections if normed else separate_projections)

    def rotation_layout(self, model):
        """LLaMA's, with every expert's down_proj writing into the residual stream and rotated online;
        the router reads the rotated stream (a follower of the norm group)."""
        downs = tuple(f"mlp.experts.{e}.down_proj" for e in range(len(self.blocks(model)[0].mlp.experts)))
        layout = super().rotation_layout(model)
        return replace(layout, writers=(layout.out, *downs), online=downs)

    def smooth_groups(self, model):
        cfg = model.config
        kv_heads, _ = self.kv_cache_shape(cfg)
        experts = self.blocks(model)[0].mlp.experts
        inner = experts[0].down_proj.in_features
        names = [f"mlp.experts.{e}" for e in range(len(experts))]
        return [
            SmoothGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",),
                        repeat=cfg.num_attention_heads // kv_heads, kv_heads=kv_heads),
            # one scale for the router and every expert (the router sees every token: statistics are its input's)
            SmoothGroup("post_attention_layernorm", "norm", tuple(f"{n}.gate_up_proj" for n in names),
                        followers=("mlp.gate",), routed=True),
            *(SmoothGroup(f"{n}.gate_up_proj", "linear", (f"{n}.down_proj",), rows=(inner, 2 * inner)) for n in names),
        ]
