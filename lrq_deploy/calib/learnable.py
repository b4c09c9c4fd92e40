"""Learnable block-wise calibration: OmniQuant-style baseline, LRQuant and LRQuant+.

Per block, parameters are learned against the block's full-precision output:
- smoothing scales per smoothing group (and shifts where the producing module has a bias),
- learnable weight clipping (LWC): sigmoid factors on each group's max and min, initialised at
  each weight group's best clipping ratio on the initially smoothed block (searched_init),
- LRQuant+ only: rank-1 "rotation" factors, init ones, placed where they fold exactly:
  a per-output-row gain carried by the stored scale, and a per-input-channel gain of each
  smoothing group folded into the module that produces the group's input (docs/METHOD.md).
- on a rotated model (--rotate) with --learn-transforms: each online transform's Kronecker
  factors times learned invertible matrices (identity at the start), the linear's weight taking
  their inverse, folded into the transform's factors (exact: the transform stays an explicit op).

The forward pass used for learning is the block itself called with substituted parameters
(torch.func.functional_call), so the modules, attention masks and rotary embeddings are the
model's own; per-token activation fake quantization is a forward pre-hook on each linear.
"""

from __future__ import annotations

import copy
from functools import partial
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import functional_call

from lrq_deploy.calib.baselines import input_stats, replace_linears, weight_absmax
from lrq_deploy.calib.blockwise import BlockJob, block_errors
from lrq_deploy.calib.recipe import Recipe
from lrq_deploy.calib.losses import DynamicWeighting, mse, nlc
from lrq_deploy.errors import LrqError
from lrq_deploy.fold import fold_smoothing, group_params, reduce_to_prev, smooth_params
from lrq_deploy.quant.grids import fake_quant_input, weight_grid
from lrq_deploy.quant.scheme import group_length
from lrq_deploy.rotate import learned_factors, online_modules, weight_for_mixes

LWC_INIT = 4.0  # the largest initial clipping logit: sigmoid(4) = 0.982
SEARCH_GRID = 20


def log_equivalent_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """LRQuant's initial smoothing scale: s = a / log2(2 + a)."""
    return act_absmax / torch.log2(2 + act_absmax)


def smoothquant_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    return (act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def lwc_factor(logit: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logit)


class BlockParams(nn.Module):
    """The learnable quantities of one block, flat and named so they save as safetensors."""

    def __init__(self):
        super().__init__()
        self.values = nn.ParameterDict()

    def add(self, kind: str, key: str, value: torch.Tensor) -> None:
        self.values[f"{kind}__{key.replace('.', '_')}"] = nn.Parameter(value.detach().float().clone())

    def get(self, kind: str, key: str) -> torch.Tensor | None:
        name = f"{kind}__{key.replace('.', '_')}"
        return self.values[name] if name in self.values else None

    def of_kind(self, *kinds: str) -> list[nn.Parameter]:
        return [p for n, p in self.values.items() if n.split("__")[0] in kinds]

    def tensors(self) -> dict[str, torch.Tensor]:
        """A copy (never a view of the live parameters, which the optimizer keeps changing)."""
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.values.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.values):
            raise LrqError("saved block parameters do not match this block (was the run made with other settings?)")
        with torch.no_grad():
            for name, value in tensors.items():
                self.values[name].copy_(value)


def _group_key(index: int) -> str:
    return f"group{index}"


def init_block_params(job: BlockJob, recipe: Recipe) -> BlockParams:
    params = BlockParams()
    stats = input_stats(job, [g.observed for g in job.groups], job.q_inputs)
    for i, group in enumerate(job.groups):
        amax, amin = (reduce_to_prev(s, group) for s in (stats[group.observed]["max"], -stats[group.observed]["min"]))
        amin = -amin
        shift = None
        if group.shiftable and _has_biases(job.block, group):
            shift = (amax + amin) / 2
            params.add("shift", _group_key(i), shift)
        absmax = torch.maximum(amax, -amin) if shift is None else (amax - amin) / 2
        absmax = absmax.clamp(min=1e-5)
        if recipe.init == "log":
            scale = log_equivalent_scale(absmax)
        else:
            scale = smoothquant_scale(absmax, reduce_to_prev(weight_absmax(job, group), group), job.options.alpha)
        params.add("scale", _group_key(i), scale.clamp(min=1e-5))
        if recipe.rotation:
            params.add("gain", _group_key(i), torch.ones_like(scale))
    if getattr(job.options, "learn_transforms", False):
        for name, module in online_modules(job.block).items():
            for i, size in enumerate(module.transform.sizes):
                params.add("mix", f"{name}.{i}", torch.eye(size))
    for name, scheme in job.linear_schemes.items():
        if scheme.quantize_weights:
            linear = job.block.get_submodule(name)
            groups = linear.in_features // group_length(scheme.group_size, linear.in_features)
            shape = (linear.out_features, groups)
            params.add("lwc_up", name, torch.full(shape, LWC_INIT))
            params.add("lwc_low", name, torch.full(shape, LWC_INIT))
            if recipe.rotation:
                params.add("row_gain", name, torch.ones(linear.out_features))
    params = params.to(job.device)
    searched_init(job, params)
    return params


@torch.no_grad()
def searched_init(job: BlockJob, params: BlockParams) -> None:
    """Start from searched values where fixed ones start far from a good solution: weight-only
    schemes take AWQ's activation-aware scales (activation-statistics inits serve activation
    quantization, which weight-only schemes do not have), and clipping starts at each weight
    group's best ratio on the smoothed block instead of almost none. Training then improves on
    a starting point no worse than AWQ / a clipping search, and best-epoch selection keeps it
    if training does not."""
    from lrq_deploy.calib import awq

    if not job.quantizes_weights:
        return
    if not job.quantizes_activations:
        shifts = [params.get("shift", _group_key(i)) for i in range(len(job.groups))]
        for i, (scale, _) in enumerate(awq.search_scales(job, SEARCH_GRID, shifts)):
            params.get("scale", _group_key(i)).copy_(scale)
    smoothed = copy.deepcopy(job.block)
    for i, group in enumerate(job.groups):
        fold_smoothing(smoothed, group, *_smoothing(params, i))
    most = torch.sigmoid(torch.tensor(LWC_INIT)).item()
    for name, ratio in awq.search_clips(job, SEARCH_GRID, block=smoothed).items():
        logit = torch.logit(ratio.clamp(max=most))
        params.get("lwc_up", name).copy_(logit)
        params.get("lwc_low", name).copy_(logit)


def _has_biases(block: nn.Module, group) -> bool:
    return all(block.get_submodule(n).bias is not None for n in group.linears) and (
        getattr(block.get_submodule(group.prev), "bias", None) is not None
    )


def _smoothing(params: BlockParams, index: int):
    key = _group_key(index)
    scale = params.get("scale", key)
    return scale.clamp(min=1e-5), params.get("shift", key), params.get("gain", key)


def smoothed_block_params(job: BlockJob, params: BlockParams) -> dict[str, torch.Tensor]:
    """The block's floating-point parameters after every group's smoothing (differentiable)."""
    current: dict[str, torch.Tensor] = {}
    for i, group in enumerate(job.groups):
        touched = {n: current.get(n, p.detach()) for n, p in group_params(job.block, group).items()}
        current.update(smooth_params(touched, group, *_smoothing(params, i)))
    return current


def _mixes(params: BlockParams, name: str, module) -> list[torch.Tensor] | None:
    mixes = [params.get("mix", f"{name}.{i}") for i in range(len(module.transform.sizes))]
    return None if any(m is None for m in mixes) else mixes


def transformed_block_params(job: BlockJob, params: BlockParams, current: dict) -> dict[str, torch.Tensor]:
    """The learned online transforms: each factor F_i A_i, the linear's weight W A^-T (differentiable)."""
    for name, module in online_modules(job.block).items():
        mixes = _mixes(params, name, module)
        if mixes is None:
            continue
        for i, factor in enumerate(learned_factors(module.transform, mixes)):
            current[f"{name}.transform.factor{i}"] = factor
        key = f"{name}.linear.weight"
        current[key] = weight_for_mixes(current.get(key, module.linear.weight.detach()), mixes)
    return current


def fake_quant_block_params(job: BlockJob, params: BlockParams) -> dict[str, torch.Tensor]:
    current = transformed_block_params(job, params, smoothed_block_params(job, params))
    for name, scheme in job.linear_schemes.items():
        if not scheme.quantize_weights:
            continue
        grid = weight_grid(scheme)
        key = f"{name}.weight"
        weight = current.get(key, job.block.get_submodule(name).weight.detach())
        up, low = lwc_factor(params.get("lwc_up", name)), lwc_factor(params.get("lwc_low", name))
        current[key] = grid.fake_quant(weight, grid.qparams(weight, up, low), params.get("row_gain", name))
    return current


class _WithParams(nn.Module):
    """Calls `block` with some parameters substituted, keeping the adapter's calling convention."""

    def __init__(self, block: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.block = block
        self.params = params

    def forward(self, *args, **kwargs):
        return functional_call(self.block, self.params, args, kwargs, strict=False)


@contextmanager
def activation_fake_quant(job: BlockJob):
    """Activation fake quantization on every quantized linear's input (float grids: with a scale
    taken from each input, until the layer's static scale is calibrated after the block)."""
    quantized: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(_module, args, scheme):
        # Linears sharing an input and its quantizer (q/k/v, gate/up) reuse one quantization of it:
        # same values, one pass instead of three.
        x = args[0]
        if torch.compiler.is_compiling():  # the compiler merges the identical quantizations itself
            return (fake_quant_input(x, scheme),)
        key = (id(x), scheme.abits, scheme.aformat, scheme.act_asym)
        if key not in quantized:
            quantized[key] = (x, fake_quant_input(x, scheme))  # x kept alive so its id stays unique
        return (quantized[key][1],)

    handles = [job.block.get_submodule(n).register_forward_pre_hook(partial(hook, scheme=s))
               for n, s in job.linear_schemes.items() if s.quantize_activations]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Objective:
    """MSE (+ NLC), against one or two targets, optionally with dynamic weighting."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        terms = ("mse", "nlc") if recipe.use_nlc else ("mse",)
        self.terms = terms
        branches = 2 if recipe.two_branch else 1
        self.weighting = [DynamicWeighting(terms) for _ in range(branches)] if recipe.dynamic_weighting else None

    def terms_of(self, output: torch.Tensor, targets: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The loss terms per target branch (tensors only: this part is compiled with the block)."""
        output = output.float()
        branches = []
        for target in targets:
            values = {"mse": mse(output, target)}
            if self.recipe.use_nlc:
                values["nlc"] = nlc(output, target)
            branches.append(values)
        return branches

    def combine(self, branches: list[dict[str, torch.Tensor]], observed: list[dict[str, torch.Tensor]] | None = None):
        """The loss; with dynamic weighting the running means follow `observed` (the terms of every
        rank in data-parallel calibration, else the branches themselves)."""
        total = 0.0
        for branch, values in enumerate(branches):
            if self.weighting:
                seen = observed[branch] if observed is not None else None
                total = total + self.weighting[branch](values, seen)
            else:
                total = total + sum(values.values())
        return total

    def __call__(self, output: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        return self.combine(self.terms_of(output, targets))


def loss_terms_fn(job: BlockJob, params: BlockParams, objective: Objective):
    """(inputs, targets) -> loss terms of one step: weight fake quantization, the block with activation
    fake quantization, the losses. With `compile`, torch.compile fuses it (one graph per block)."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if job.device.type == "cuda" else nullcontext()

    def step(inputs: torch.Tensor, targets: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with amp, activation_fake_quant(job):
            block = _WithParams(job.block, fake_quant_block_params(job, params))
            output = job.adapter.run_block(block, inputs, job.kwargs)
            return objective.terms_of(output, targets)

    if not job.options.compile:
        return step
    torch.compiler.reset()  # a fresh cache per block: guards on one block's modules would pile up to the recompile limit
    # Inductor drops float32 -> float16 -> float32 round trips inside fused kernels unless told to
    # emulate them; the scales must be rounded to float16 exactly as they are deployed.
    return torch.compile(step, options={"emulate_precision_casts": True})


def _step_loss(job: BlockJob, step, objective: Objective, batch: torch.Tensor, targets: list) -> torch.Tensor:
    """Backpropagate this rank's part of one batch; return the batch loss (every rank's, the same
    on all ranks). Each rank's terms are scaled by its share of the batch, so summed over ranks
    they are the terms of the whole batch (one rank: a share of 1, the terms as computed)."""
    local = job.collective.local_positions(batch)
    if len(local):
        share = len(local) / len(batch)
        branches = step(job.q_inputs[local].to(job.device), [t[local].to(job.device) for t in targets])
        branches = [{k: v * share for k, v in b.items()} for b in branches]
    else:  # none of this batch's samples live on this rank: it still takes part in every reduction
        branches = [{name: torch.zeros((), device=job.device) for name in objective.terms} for _ in targets]
    observed = [{k: job.collective.sum(v.detach()) for k, v in b.items()} for b in branches]
    loss = objective.combine(branches, observed)
    if len(local):
        loss.backward()
    return job.collective.sum(loss.detach())


@torch.no_grad()
def fake_quant_errors(job: BlockJob, params: BlockParams) -> dict[str, float]:
    """MSE and per-token cosine of the fake-quantized block (current parameters) against the FP
    block output, over all calibration samples: the quantity every epoch is judged by (the
    training loss mixes terms with moving weights and is not comparable across epochs)."""
    with activation_fake_quant(job):
        block = _WithParams(job.block, fake_quant_block_params(job, params))
        output = job.run(job.q_inputs, block=block)
    return block_errors(job.fp_targets, output, job.collective)


def train_block(job: BlockJob, params: BlockParams, recipe: Recipe, progress=None) -> dict:
    """Train the block's parameters; keep those of the epoch whose block output is closest to the
    FP block output (epoch 0: the initialisation), so training never leaves a block worse than it
    started. Returns the training record: loss_curve, mse / cosine per epoch, best_epoch."""
    cfg, options = job.cconfig, job.options
    groups = [
        {"params": params.of_kind("scale", "shift", "gain", "row_gain", "mix"), "lr": options.lr_smooth},
        {"params": params.of_kind("lwc_up", "lwc_low"), "lr": options.lr_lwc},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    targets = [job.fp_targets]
    if recipe.two_branch:  # homologous reconstruction: the FP block on the quantized inputs
        targets.append(job.run(job.q_inputs))
    objective = Objective(recipe)
    step = loss_terms_fn(job, params, objective)
    generator = torch.Generator().manual_seed(cfg.seed + job.index)
    curve = []
    errors = [fake_quant_errors(job, params)]
    best = (errors[0]["mse"], 0, params.tensors())
    for epoch in range(options.epochs):
        order = torch.randperm(job.samples, generator=generator)
        epoch_loss = 0.0
        for batch in order.split(cfg.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = _step_loss(job, step, objective, batch, targets)
            if not torch.isfinite(loss):
                raise LrqError(f"block {job.index}, epoch {epoch}: the loss became NaN or inf (lower the learning rates)")
            job.collective.sum_grads(params.values.values())
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
        curve.append(epoch_loss / job.samples)
        errors.append(fake_quant_errors(job, params))
        if errors[-1]["mse"] < best[0]:
            best = (errors[-1]["mse"], epoch + 1, params.tensors())
        if progress:
            progress(epoch, curve[-1])
    params.load({k: v.to(job.device) for k, v in best[2].items()})
    return {"loss_curve": curve, "mse_per_epoch": [e["mse"] for e in errors],
            "cosine_per_epoch": [e["cosine"] for e in errors], "best_epoch": best[1]}


# --rounding gptq keeps, per block, whichever of these gives the block output closest to the FP
# block's on windows it was not trained on (BlockJob.validation): GPTQ under the learned transforms
# can lose to either part alone (GPTQ's error feedback fights a learned clipping; smoothing can
# leave GPTQ a harder Hessian), and on the training windows the learned candidates look better
# than they are (they were fitted there).
ROUNDINGS = ("learned+gptq", "gptq", "learned+nearest")


@torch.no_grad()
def fold_and_quantize(job: BlockJob, params: BlockParams) -> dict:
    """Write the learned smoothing into the block and replace its linears by QuantLinears; with
    --rounding gptq, by the best of ROUNDINGS. Returns {"rounding": chosen, "rounding_mse": {...},
    "rounding_judged_on": "held-out" | "calibration"} (empty for nearest rounding)."""
    if not (job.quantizes_weights and job.options.rounding == "gptq"):
        _quantize_as(job, params, "learned+nearest")
        return {}
    from dataclasses import replace

    from lrq_deploy.calib.blockwise import calibrate_input_scales

    pristine = copy.deepcopy(job.block)
    validation = job.validation()
    errors = {}
    for rounding in ROUNDINGS:
        trial = replace(job, block=copy.deepcopy(pristine))
        _quantize_as(trial, params, rounding)
        calibrate_input_scales(trial)  # as the engine does after the method (float grids' static scales)
        errors[rounding] = validation.error(trial)
        del trial
    chosen = min(ROUNDINGS, key=lambda r: errors[r])  # ties: the earlier, learned+gptq first
    _quantize_as(job, params, chosen)
    return {"rounding": chosen, "rounding_mse": errors, "rounding_judged_on": validation.source}


def fold_transforms(job: BlockJob, params: BlockParams) -> None:
    """Write the learned online transforms into the block: the factors F_i A_i, the weight W A^-T
    (the same arithmetic as transformed_block_params, so what was trained is what is folded)."""
    folded = transformed_block_params(job, params, {})
    for name, value in folded.items():
        owner, _, attribute = name.rpartition(".")
        getattr(job.block.get_submodule(owner), attribute).copy_(value)


def _quantize_as(job: BlockJob, params: BlockParams, rounding: str) -> None:
    learned = rounding.startswith("learned")
    if learned:
        for i, group in enumerate(job.groups):
            fold_smoothing(job.block, group, *_smoothing(params, i))
        fold_transforms(job, params)
    clip = {}
    if learned:
        clip = {
            n: (lwc_factor(params.get("lwc_up", n)), lwc_factor(params.get("lwc_low", n)), params.get("row_gain", n))
            for n, scheme in job.linear_schemes.items() if scheme.quantize_weights
        }
    if rounding.endswith("gptq"):
        from lrq_deploy.calib.gptq import gptq_block
        from lrq_deploy.calib.methods.gptq import GPTQOptions

        gptq = GPTQOptions()
        gptq_block(job, gptq.damp, gptq.act_order, gptq.block_size, clip=clip)
    else:
        replace_linears(job, clip)


def learn_block(job: BlockJob, recipe: Recipe) -> dict:
    """A learnable method on one block: train its parameters (or read them back from the run
    directory of an interrupted run), fold them, quantize. Returns the training record."""
    for p in job.block.parameters():
        p.requires_grad_(False)
    params = init_block_params(job, recipe)
    saved = job.run_dir.load_block(job.index) if job.run_dir else None
    if saved is not None:
        params.load({k: v.to(job.device) for k, v in saved.items()})
        record = job.run_dir.block_record(job.index)
    else:
        record = train_block(job, params, recipe, job.epoch_progress)
        if job.run_dir and job.collective.main:
            job.run_dir.save_block(job.index, params.tensors(), record)
    return {**record, **fold_and_quantize(job, params)}
