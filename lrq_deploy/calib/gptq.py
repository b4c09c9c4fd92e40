"""GPTQ rounding (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a linear's weight one input column at a time and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ||X W^T - X Q^T||^2, H = 2/n sum x x^T.

The output is the checkpoint's own form (the scheme's grid: integer codes, float16-exact scales,
zero points, or a float grid's codes and scales), so export and kernels are unchanged. Float grids
take their scales from the weight before any update (their block scales are not re-derived). With activation order (columns by decreasing H diagonal) and
groups, the groups' scales and zero points are taken from the weight before any update ("static
groups"): every group keeps its contiguous input channels, and no permutation reaches the
checkpoint or the kernels.

The scales come from a clipping search by default (clip="mse", as the GPTQ authors' `--mse`
quantizer and llm-compressor's MSE observer): per output row and group, the range shrunk by the
factor in 1, 0.99, ..., 0.21 whose round-to-nearest weight error sum |w - q(w)|^2.4 is least;
dynamic groups search on the weight as updated when the group is reached. clip="minmax" keeps the
full range. Measured per channel, this search is most of the gap between min-max GPTQ and learned
clipping (docs/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lrq_deploy.calib.distributed import SINGLE, Collective
from lrq_deploy.errors import LrqError
from lrq_deploy.quant.grids import weight_grid
from lrq_deploy.quant.primitives import quantize_weight
from lrq_deploy.quant.scheme import QuantScheme, group_length

__all__ = ["CLIPS", "HessianCapture", "clip_search", "gptq_quantize", "gptq_round"]

CLIPS = ("mse", "minmax")
CLIP_STEPS, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4


class HessianCapture:
    """Accumulates H = 2/n sum x x^T over the inputs a module receives (forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.sum: torch.Tensor | None = None
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        x = args[0].detach().flatten(0, -2).float()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        self.sum += (x.T @ x).double()  # float64 sums: the result does not depend on the batch split
        self.count += x.shape[0]

    def finish(self, collective: Collective = SINGLE) -> torch.Tensor:
        """Remove the hook and return H (float32), summed over every calibration rank."""
        self._handle.remove()
        if self.sum is None:
            raise LrqError("GPTQ: a linear received no calibration input")
        total = collective.sum(torch.cat([self.sum.flatten(), self.sum.new_tensor([self.count])]))
        count = total[-1]
        return (2 * total[:-1].view_as(self.sum) / count).float()


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more damping if H is too ill-conditioned."""
    eye = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    mean_diag = torch.diag(hessian).mean()
    for attempt in range(4):
        dampened = hessian + (damp * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(dampened)
        if not info:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                return upper
    raise LrqError(f"GPTQ: the Hessian stays singular with dampening up to {damp * 1000:g}; "
                   "use more calibration samples or a larger --damp")


@torch.no_grad()
def clip_search(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per output row and weight group, the range factor f (both ends scaled by f) whose round-to-nearest
    error sum |w - q(w)|^2.4 is least: [out, groups] factors for the grid's qparams."""
    grid = weight_grid(scheme)
    size = group_length(scheme.group_size, w.shape[1])
    rows, groups = w.shape[0], w.shape[1] // size
    factors = 1 - torch.arange(int(CLIP_MAX_SHRINK * CLIP_STEPS), device=w.device) / CLIP_STEPS
    best_error = torch.full((rows, groups), float("inf"), device=w.device)
    best = torch.ones(rows, groups, device=w.device)
    chunk = max(1, (1 << 24) // w.numel())  # factors tried at once: the weight repeated, ~64 MB at most
    for chunk_factors in factors.split(chunk):
        k = len(chunk_factors)
        tiled = w.repeat(k, 1)
        factor = chunk_factors.repeat_interleave(rows)[:, None].expand(k * rows, groups)
        error = (grid.fake_quant(tiled, grid.qparams(tiled, factor, factor)) - tiled).abs().pow(CLIP_NORM)
        error, index = error.view(k, rows, groups, size).sum(dim=-1).min(dim=0)  # ties: the first, the widest range
        better = error < best_error
        best_error, best = torch.where(better, error, best_error), torch.where(better, chunk_factors[index], best)
    return best


def _searched_qparams(w: torch.Tensor, scheme: QuantScheme, clip: str) -> tuple:
    grid = weight_grid(scheme)
    if clip == "minmax":
        return grid.qparams(w)
    factor = clip_search(w, scheme)
    return grid.qparams(w, factor, factor)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float = 0.01, act_order: bool = False,
    block_size: int = 128, qparams: tuple[torch.Tensor, torch.Tensor] | None = None, clip: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-round `weight` [out, in] on an integer grid: (codes uint8 [out, in], scale, zero [out, groups]).
    See gptq_round."""
    rounded, (scale, zero) = gptq_round(weight, hessian, scheme, damp, act_order, block_size, qparams, clip)
    return quantize_weight(rounded, scale, zero, scheme.wbits, scheme.group_size), scale, zero


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float = 0.01, act_order: bool = False,
    block_size: int = 128, qparams: tuple | None = None, clip: str = "mse",
) -> tuple[torch.Tensor, tuple]:
    """GPTQ-round `weight` [out, in] under `scheme`: (the rounded weight on the grid, its qparams).

    qparams: fixed group parameters (e.g. from learned clipping); by default they come from
    the weight by the `clip` rule (module docstring): per group as each group is reached (from the
    weight as updated so far; integer grids), or from the original weight with act_order,
    per-channel groups or a float grid.
    With an identity Hessian and clip="minmax" no error is spread and the result is round-to-nearest's.
    """
    grid = weight_grid(scheme)
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    size = group_length(scheme.group_size, in_features)
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    if qparams is None and (act_order or scheme.group_size is None or scheme.float_format):
        qparams = _searched_qparams(w, scheme, clip)
    dynamic = qparams is None
    groups = in_features // size
    if dynamic:
        qparams = (w.new_empty(out_features, groups), w.new_empty(out_features, groups))
    else:
        qparams = tuple(t.detach().float().clone() for t in qparams)
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(in_features)
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, damp)
    step = max(block_size // size, 1) * size if scheme.group_size else block_size  # blocks hold whole groups
    rounded = torch.empty_like(w)
    for start in range(0, in_features, step):
        end = min(start + step, in_features)
        block, errors, hblock = w[:, start:end].clone(), w.new_zeros(out_features, end - start), hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = int(order[column]) // size
            if dynamic and column % size == 0:
                s, z = _searched_qparams(block[:, i:i + size], replace(scheme, group_size=None), clip)
                qparams[0][:, group], qparams[1][:, group] = s[:, 0], z[:, 0]
            rounded[:, column] = grid.round_columns(block[:, i:i + 1], qparams, slice(group, group + 1))[:, 0]
            error = (block[:, i] - rounded[:, column]) / hblock[i, i]
            block[:, i:] -= error[:, None] * hblock[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return rounded[:, torch.argsort(order)], qparams


def input_stages(job) -> list[list[str]]:
    """The block's linears in order, those sharing one input (a smoothing group) together; routed
    experts each alone (each sees its own tokens)."""
    stages, seen = [], set()
    for name in job.linear_names:
        if name in seen:
            continue
        group = next((g.linears for g in job.groups if name in g.linears and not g.routed), (name,))
        stage = [n for n in group if n in job.linear_names and n not in seen]
        stages.append(stage)
        seen.update(stage)
    return stages


@torch.no_grad()
def gptq_block(job, damp: float, act_order: bool, block_size: int, clip: dict | None = None,
               clip_rule: str = "mse") -> dict:
    """GPTQ-quantize a block's linears sequentially: each stage's Hessian is taken from inputs
    that passed through the stages already quantized. clip: learned (upper, lower, row_gain)
    factors per linear (LRQuant's clipping), which fix the scales and zero points; linears without
    them take their scales by `clip_rule`."""
    from lrq_deploy.calib.baselines import quantize_linear
    from lrq_deploy.models.base import replace_module
    from lrq_deploy.quant import QuantLinear

    for stage in input_stages(job):
        stage = [name for name in stage if job.scheme(name).quantize_weights]
        if not stage:
            continue
        capture = HessianCapture(job.block.get_submodule(stage[0]))
        try:
            job.run(job.q_inputs)
        finally:
            hessian = capture.finish(job.collective)
        for name in stage:
            linear = job.block.get_submodule(name)
            scheme = job.scheme(name)
            grid = weight_grid(scheme)
            upper, lower, gain = (clip or {}).get(name, (None, None, None))
            qparams = None if upper is None else grid.qparams(linear.weight.detach().float(), upper, lower)
            rounded, qparams = gptq_round(linear.weight, hessian, scheme, damp, act_order, block_size, qparams,
                                          clip_rule)
            bias = None if linear.bias is None else linear.bias.detach()
            stored = grid.stored(rounded, qparams, gain)
            layer = QuantLinear.from_stored(stored, rounded.shape[1], bias, scheme)
            replace_module(job.block, name, layer.to(linear.weight.device))
    for name, scheme in job.linear_schemes.items():  # activations-only linears: weights stay float
        if not scheme.quantize_weights:
            replace_module(job.block, name, quantize_linear(job.block.get_submodule(name), scheme))
    return {}
