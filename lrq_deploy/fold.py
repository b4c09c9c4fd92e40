"""Exact folding of channel-wise smoothing (scale, shift, gain) into the weights around it.

For a smoothing group with input X shared by linears W_i (y_i = X W_i^T + b_i):
    X' = g * (X - delta) / s,   W_i' = W_i * s,   b_i' = b_i + W_i delta
The module producing X (a norm, or the output rows of a linear) absorbs the map:
    prev.weight' = prev.weight * g / s,   prev.bias' = (prev.bias - delta) * g / s
(a norm scaling by (c + weight), as Gemma's (1 + weight): prev.weight' = (c + prev.weight) * g / s - c).
With the gain g = 1 (every method but LRQuant+) the block computes exactly the same
function. LRQuant+ learns g (its input-side rotation factor): it changes what the
quantized linears see, and still folds exactly into prev.

`smooth_params` is the functional form used while learning (differentiable, no in-place
writes); `fold_smoothing` writes the same arithmetic into a block, so what was trained is
bit-for-bit what is folded.
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


def group_params(block: nn.Module, group: SmoothGroup) -> dict[str, torch.Tensor]:
    """The block parameters a smoothing group touches, by their names in the block."""
    names = [f"{group.prev}.weight", f"{group.prev}.bias"]
    for linear in group.linears + group.followers:
        names += [f"{linear}.weight", f"{linear}.bias"]
    own = dict(block.named_parameters())
    return {n: own[n] for n in names if n in own}


def smooth_params(
    params: dict[str, torch.Tensor], group: SmoothGroup, scale: torch.Tensor,
    shift: torch.Tensor | None = None, gain: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Return a copy of `params` with the group's smoothing applied (scale/shift/gain in prev space)."""
    out = dict(params)
    consumer_scale = expand_to_consumer(scale, group)
    for name in group.linears + group.followers:
        weight = params[f"{name}.weight"]
        if shift is not None:
            out[f"{name}.bias"] = params[f"{name}.bias"] + weight @ expand_to_consumer(shift, group)
        out[f"{name}.weight"] = weight * consumer_scale.view(1, -1)
    factor = 1.0 / scale if gain is None else gain / scale
    rows = slice(*group.rows) if group.rows else slice(None)
    prev_weight = params[f"{group.prev}.weight"] + group.norm_offset
    view = (-1, 1) if group.prev_kind == "linear" else (-1,)
    out[f"{group.prev}.weight"] = _scale_rows(prev_weight, rows, factor.view(*view)) - group.norm_offset
    bias_name = f"{group.prev}.bias"
    if bias_name in params:
        bias = params[bias_name]
        new = (bias[rows] - shift) * factor if shift is not None else bias[rows] * factor
        out[bias_name] = _replace_rows(bias, rows, new)
    return out


def _scale_rows(tensor: torch.Tensor, rows: slice, factor: torch.Tensor) -> torch.Tensor:
    return _replace_rows(tensor, rows, tensor[rows] * factor)


def _replace_rows(tensor: torch.Tensor, rows: slice, new: torch.Tensor) -> torch.Tensor:
    if rows == slice(None):
        return new
    return torch.cat([tensor[: rows.start], new, tensor[rows.stop :]])


@torch.no_grad()
def fold_smoothing(
    block: nn.Module, group: SmoothGroup, scale: torch.Tensor,
    shift: torch.Tensor | None = None, gain: torch.Tensor | None = None,
) -> None:
    """Write the group's smoothing into `block` in place."""
    params = group_params(block, group)
    for name, value in smooth_params(params, group, scale, shift, gain).items():
        params[name].copy_(value)
