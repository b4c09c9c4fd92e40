"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression"):
per smoothing group, the channel scale s = mean|X|^r (r on a grid) that minimises the group's
quantized output error, folded exactly into the module before the group; then, per linear, the
clipping ratio of each weight group that minimises its output error. Both searches score every
candidate on the calibration inputs of every rank (losses summed), so all ranks choose alike.

The result is what the other methods produce: smoothing folded by fold.py, clip factors of
quant/primitives.weight_qparams, codes by round to nearest.
"""

from __future__ import annotations

import torch

from lrq_deploy.calib.baselines import capture_inputs, replace_linears
from lrq_deploy.calib.blockwise import BlockJob
from lrq_deploy.fold import expand_to_consumer, fold_smoothing, reduce_to_prev
from lrq_deploy.models.base import SmoothGroup
from lrq_deploy.quant.grids import fake_quant_input, weight_grid
from lrq_deploy.quant.scheme import QuantScheme, group_length

__all__ = ["awq_block", "search_clip", "search_clips", "search_scale", "search_scales"]

SCALE_ROWS = 4096  # tokens per rank scored by the scale search
CLIP_ROWS = 512  # tokens per rank scored by the clipping search
MAX_SHRINK = 0.5  # clipping ratios tried: 1, 1 - 1/grid, ... down to 1 - MAX_SHRINK


def rtn(weight: torch.Tensor, scheme: QuantScheme, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize, both ends of each group's range scaled by `factor`."""
    grid = weight_grid(scheme)
    return grid.fake_quant(weight, grid.qparams(weight, factor, factor))


@torch.no_grad()
def awq_block(job: BlockJob, grid: int, clip: bool) -> dict:
    """Search and fold every group's scales, search clipping, round the block's linears to nearest."""
    if not job.quantizes_weights:  # nothing to protect: activations only
        replace_linears(job)
        return {}
    found = search_scales(job, grid)
    for group, (scale, _) in zip(job.groups, found):
        fold_smoothing(job.block, group, scale)
    factors = {name: (factor, factor, None) for name, factor in search_clips(job, grid).items()} if clip else {}
    replace_linears(job, factors)
    return {"awq_ratios": [ratio for _, ratio in found]}


def search_scales(job: BlockJob, grid: int, shifts: list | None = None) -> list[tuple[torch.Tensor, float]]:
    """(scale, exponent) of every smoothing group, searched on the inputs the groups receive now
    (less the group's shift, where `shifts` gives one). Searches read only each group's own
    linears, so folding one group's scale does not change another's search."""
    inputs = capture_inputs(job, [g.observed for g in job.groups], SCALE_ROWS)
    found = []
    for i, group in enumerate(job.groups):
        x, shift = inputs[group.observed], shifts[i] if shifts else None
        if shift is not None:
            x = x - expand_to_consumer(shift, group)
        found.append(search_scale(job, group, x, grid))
    return found


def search_clips(job: BlockJob, grid: int, block: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Clip factors [out, groups] of every linear of `block` (default the job's), searched on the
    inputs each receives."""
    block = block or job.block
    inputs = capture_inputs(job, job.linear_names, CLIP_ROWS, block=block)
    return {name: search_clip(job, block.get_submodule(name).weight, inputs[name], grid, job.scheme(name))
            for name in job.linear_names if job.scheme(name).quantize_weights}


def search_scale(job: BlockJob, group: SmoothGroup, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, float]:
    """The scale (prev's channel space) among mean|X|^r, r = 0, 1/grid, ..., with the least summed
    squared output error of the group's linears; r = 0 is plain round to nearest."""
    linears = [n for n in group.linears if n in job.linear_names]
    if not linears:  # every reader kept in floating point: nothing to protect
        return reduce_to_prev(x.new_ones(x.shape[1]), group), 0.0
    schemes = [job.scheme(n) for n in linears]
    weights = [job.block.get_submodule(n).weight.float() for n in linears]
    targets = [x @ w.T for w in weights]
    totals = job.collective.sum(torch.cat([x.abs().sum(dim=0), x.new_tensor([len(x)])]).double())
    activity = reduce_to_prev((totals[:-1] / totals[-1]).float(), group)  # mean |x| over every rank's tokens
    candidates, losses = [], []
    for step in range(grid):
        scale = activity.pow(step / grid).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        consumer = expand_to_consumer(scale, group)
        seen = _inputs_as_quantized(x / consumer, schemes)
        losses.append(sum((seen[s.abits, s.aformat, s.act_asym] @ rtn(w * consumer, s).T - t).double().pow(2).sum()
                          for w, t, s in zip(weights, targets, schemes)))
        candidates.append(scale)
    best = int(job.collective.sum(torch.stack(losses).double()).argmin())
    return candidates[best].to(weights[0].dtype), best / grid


def _inputs_as_quantized(x: torch.Tensor, schemes: list[QuantScheme]) -> dict[tuple, torch.Tensor]:
    """x as each distinct activation quantizer among `schemes` sees it (linears sharing one share it)."""
    seen = {}
    for s in schemes:
        if (s.abits, s.aformat, s.act_asym) not in seen:
            seen[s.abits, s.aformat, s.act_asym] = fake_quant_input(x, s)
    return seen


def search_clip(job, weight: torch.Tensor, x: torch.Tensor, grid: int, scheme: QuantScheme) -> torch.Tensor:
    """Per output row and weight group, the clipping ratio with the least squared output error
    (cross-group terms ignored, as in AWQ) under `scheme`: factors [out, groups] for weight_qparams."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    size = group_length(scheme.group_size, in_features)
    groups = in_features // size
    x_groups = x.view(len(x), groups, size)
    best_error = torch.full((out_features, groups), float("inf"), dtype=torch.float64, device=w.device)
    best = torch.ones(out_features, groups, device=w.device)
    for step in range(int(MAX_SHRINK * grid) + 1):
        factor = torch.full_like(best, 1 - step / grid)
        error = (w - rtn(w, scheme, factor)).view(out_features, groups, size)
        error = job.collective.sum(_group_output_error(x_groups, error))
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, factor, best)
    return best


def _group_output_error(x_groups: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """sum_t (x_t,g . e_o,g)^2 for every row o and group g, in row chunks that bound the memory.
    In float64, so that sums over ranks in another order pick the same candidates."""
    rows = max(1, (1 << 24) // (x_groups.shape[0] * x_groups.shape[1]))
    x_groups = x_groups.double()
    parts = [torch.einsum("tgs,ogs->tog", x_groups, chunk.double()).pow(2).sum(dim=0) for chunk in error.split(rows)]
    return torch.cat(parts)
