"""What an adapter says about its attention for fused attention kernels (export/attention.py):
the modules, head counts and rotary tables onnxruntime's GroupQueryAttention computes with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttentionLayout:
    """What GroupQueryAttention needs of a model: its attention modules (with q_proj, k_proj,
    v_proj, o_proj and layer_idx), head counts, and the rotary tables over every position."""

    modules: list[nn.Module]
    num_heads: int
    kv_heads: int
    head_dim: int
    cos: torch.Tensor  # [max positions, head_dim / 2]
    sin: torch.Tensor
    scale: float


def rotary_tables(rotary_embedding: nn.Module, positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of every position from an HF rotary-embedding module (its own frequencies and
    attention scaling), halved: rotate-half rotary repeats each frequency twice."""
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary_embedding(probe, torch.arange(positions)[None])
    return cos[0, :, : head_dim // 2].contiguous(), sin[0, :, : head_dim // 2].contiguous()
