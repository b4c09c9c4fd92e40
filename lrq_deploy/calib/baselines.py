"""Calibration-free and statistics-only baselines (RTN, SmoothQuant) and the helpers the other
methods share: round-to-nearest linears, activation statistics."""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy.calib.blockwise import BlockJob
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.fold import fold_smoothing, reduce_to_prev
from lrq_deploy.models.base import replace_module
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.grids import weight_grid


def quantize_linear(linear: nn.Linear, config: QuantScheme, upper=None, lower=None, row_gain=None) -> QuantLinear:
    """Round-to-nearest quantization of one linear, optionally with learned LWC clip factors
    (upper/lower, [out, groups]) and a per-row gain carried by the stored scale."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if not config.quantize_weights:
        return QuantLinear.from_float(weight, bias, config)
    grid = weight_grid(config)
    stored = grid.stored(weight, grid.qparams(weight, upper, lower), row_gain)
    return QuantLinear.from_stored(stored, weight.shape[1], bias, config).to(weight.device)


def replace_linears(job: BlockJob, clip_factors: dict | None = None) -> None:
    """Round every linear of the job's block to nearest under its scheme (and clip factors, if given)."""
    for name, scheme in job.linear_schemes.items():
        factors = (clip_factors or {}).get(name, ())
        replace_module(job.block, name, quantize_linear(job.block.get_submodule(name), scheme, *factors))


@torch.no_grad()
def input_stats(job: BlockJob, names: list[str], hidden: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per-input-channel max and min seen by each named linear over the calibration inputs."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name in names:
        def hook(_module, args, name=name):
            flat = args[0].detach().flatten(0, -2).float()
            cmax, cmin = flat.amax(dim=0), flat.amin(dim=0)
            if name in stats:
                cmax, cmin = torch.maximum(stats[name]["max"], cmax), torch.minimum(stats[name]["min"], cmin)
            stats[name] = {"max": cmax, "min": cmin}

        handles.append(job.block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        job.run(hidden)
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"max": job.collective.max(s["max"]), "min": job.collective.min(s["min"])} for name, s in stats.items()}


def weight_absmax(job: BlockJob, group) -> torch.Tensor:
    """Per-input-channel max |w| over all linears of a smoothing group."""
    amax = torch.stack([job.block.get_submodule(n).weight.detach().abs().amax(dim=0) for n in group.linears])
    return amax.amax(dim=0)


def smoothquant(job: BlockJob, alpha: float) -> dict:
    """SmoothQuant: s = max|X|^alpha / max|W|^(1 - alpha), folded into the preceding module."""
    stats = input_stats(job, [g.observed for g in job.groups], job.q_inputs)
    for group in job.groups:
        first = stats[group.observed]
        a = reduce_to_prev(torch.maximum(first["max"], -first["min"]), group)
        w = reduce_to_prev(weight_absmax(job, group), group)
        scale = (a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        fold_smoothing(job.block, group, scale)
    replace_linears(job)
    return {}


@torch.no_grad()
def capture_inputs(job: BlockJob, names: list[str], max_rows: int | None = None,
                   block: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The input rows (tokens, float32) each named linear of `block` (default the job's) receives
    over this rank's calibration samples, evenly thinned to at most `max_rows` tokens."""
    block = block or job.block
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].detach().flatten(0, -2).float())) for name in names]
    try:
        job.run(job.q_inputs, block=block)
    finally:
        for handle in handles:
            handle.remove()
    rows = {name: torch.cat(chunks) for name, chunks in seen.items()}
    if max_rows is None:
        return rows
    return {name: x[torch.linspace(0, len(x) - 1, min(max_rows, len(x)), device=x.device).round().long()]
            for name, x in rows.items()}
