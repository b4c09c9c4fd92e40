"""Exact folding of channel-wise smoothing (scale and shift) into the weights around it.

For a smoothing group with input X shared by linears W_i (y_i = X W_i^T + b_i):
    X' = (X - delta) / s,   W_i' = W_i * s,   b_i' = b_i + W_i delta
so y_i is unchanged, and the module producing X (a norm or a linear) absorbs the division:
    prev.weight' = prev.weight / s,  prev.bias' = (prev.bias - delta) / s.
"""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy.models.base import SmoothGroup


def expand_to_consumer(values: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    """Map a per-channel vector from prev's output space to the consumers' input space."""
    if group.repeat == 1:
        return values
    return values.view(group.kv_heads, -1).repeat_interleave(group.repeat, dim=0).flatten()


def reduce_to_prev(values: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    """Max over the consumer channels that share one prev channel (inverse of expand_to_consumer)."""
    if group.repeat == 1:
        return values
    return values.view(group.kv_heads, group.repeat, -1).amax(dim=1).flatten()


def _prev_rows(group: SmoothGroup) -> slice:
    return slice(*group.rows) if group.rows else slice(None)


@torch.no_grad()
def fold_smoothing(block: nn.Module, group: SmoothGroup, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Fold X' = (X - shift) / scale into `block` in place (scale, shift in prev's channel space)."""
    prev = block.get_submodule(group.prev)
    rows = _prev_rows(group)
    consumer_scale = expand_to_consumer(scale, group)
    for name in group.linears:
        linear = block.get_submodule(name)
        if shift is not None:
            correction = linear.weight @ expand_to_consumer(shift, group)
            if linear.bias is None:
                linear.bias = nn.Parameter(correction)
            else:
                linear.bias.add_(correction)
        linear.weight.mul_(consumer_scale.view(1, -1))
    if shift is not None:
        prev.bias[rows] -= shift
    if group.prev_kind == "linear":
        prev.weight[rows] /= scale.view(-1, 1)
    else:
        prev.weight[rows] /= scale
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows] /= scale
