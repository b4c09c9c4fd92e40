"""What an adapter says about its attention for fused attention kernels (export/attention.py):
the modules, head counts, rotary tables and windows onnxruntime's GroupQueryAttention computes
with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# rotary embeddings whose tables do not depend on the sequence (GroupQueryAttention reads fixed ones)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def separate_projections(module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v of an attention module with q_proj, k_proj and v_proj."""
    return module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)


@dataclass
class AttentionLayout:
    """What GroupQueryAttention needs of a model: its attention modules (with o_proj and
    layer_idx), how one computes q, k and v from its input, head counts, and per module its
    rotary tables over every position and its window."""

    modules: list[nn.Module]
    num_heads: int
    kv_heads: int
    head_dim: int
    tables: list[tuple[torch.Tensor, torch.Tensor]]  # per module (cos, sin) [max positions, head_dim / 2], shared
    scale: float
    project: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]] = separate_projections
    windows: list[int] | None = None  # per module: the tokens a query sees, itself included (-1: all); None: all
    softcap: float = 0.0  # attention scores through softcap * tanh(score / softcap) where > 0

    def window_of(self, index: int) -> int:
        return -1 if self.windows is None else self.windows[index]


def rotary_tables(rotary_embedding: nn.Module, positions: int, head_dim: int, *layer_type: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of every position from an HF rotary-embedding module (its own frequencies and
    attention scaling; of one layer type where it keeps one per type), halved: rotate-half rotary
    repeats each frequency twice."""
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary_embedding(probe, torch.arange(positions)[None], *layer_type)
    return cos[0, :, : head_dim // 2].contiguous(), sin[0, :, : head_dim // 2].contiguous()


def normed_projections(module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v of a module whose queries and keys pass a per-head norm (q_norm, k_norm over its
    head_dim) before rotary (Qwen3, Gemma 3): the norms stay in the graph ahead of the node."""
    batch, seq = hidden.shape[:2]
    heads = (batch, seq, -1, module.head_dim)
    q = module.q_norm(module.q_proj(hidden).view(heads)).reshape(batch, seq, -1)
    k = module.k_norm(module.k_proj(hidden).view(heads)).reshape(batch, seq, -1)
    return q, k, module.v_proj(hidden)


def rotary_attention_layout(adapter, model: nn.Module, project=separate_projections, windows: list[int] | None = None,
                            softcap: float = 0.0) -> AttentionLayout | None:
    """The layout of a decoder whose layers' `self_attn` apply full rotate-half rotary from fixed
    tables (the decoder's rotary_emb) with causal attention, a sliding window only where `windows`
    gives it per layer; None otherwise (the graph then keeps standard ops)."""
    cfg = model.config
    rotary = getattr(adapter.decoder(model), "rotary_emb", None)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    rope = getattr(rotary, "rope_type", "default")
    per_type = isinstance(rope, dict)  # one rotary per layer type (Gemma 3: local and global layers)
    if rotary is None or (window and windows is None) or any(r not in STATIC_ROPE for r in
                                                              (rope.values() if per_type else [rope])):
        return None
    if (getattr(cfg, "partial_rotary_factor", None) or 1.0) != 1.0:
        return None
    kv_heads, head_dim = adapter.kv_cache_shape(cfg)
    modules = [block.self_attn for block in adapter.blocks(model)]
    positions = adapter.max_sequence_length(model)
    if per_type:
        by_type = {kind: rotary_tables(rotary, positions, head_dim, kind) for kind in set(cfg.layer_types)}
        tables = [by_type[kind] for kind in cfg.layer_types[:len(modules)]]
    else:
        tables = [rotary_tables(rotary, positions, head_dim)] * len(modules)
    return AttentionLayout(modules, cfg.num_attention_heads, kv_heads, head_dim, tables, modules[0].scaling, project,
                           windows, softcap)
