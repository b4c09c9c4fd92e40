"""A scheme per linear under a bit budget (`lrq calibrate --effective-bits 3.5`).

Sensitivity is measured, not modelled: for every linear and every candidate scheme, the linear
alone is rounded to nearest under the candidate and the relative change of the model's output
over the search samples, ||y_q - y||^2 / ||y||^2, is its cost (the rest of the model stays in
floating point). The choice is a multiple-choice knapsack over the linears: every linear starts
at its cheapest candidate, then the upgrade with the largest error drop per added bit that still
fits the budget is taken, until none fits (the greedy of the knapsack's convex hull). Bits are
counted as deployed (quant/layer_schemes.effective_bits: codes, group scales, zero points) and
weighted by each linear's parameter count. The chosen schemes become one rule per linear; the
method then calibrates the model under them. The table of costs, bits and choices goes into the
checkpoint's manifest and the run directory.

The cost is (linears x candidates) forward passes of the search samples (at most SEARCH_SAMPLES
calibration samples), on the model as it will be calibrated (after --rotate).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lrq_deploy.calib.blockwise import block_linears, to_device
from lrq_deploy.errors import LrqError
from lrq_deploy.progress import step
from lrq_deploy.quant.grids import weight_grid
from lrq_deploy.quant.layer_schemes import LayerSchemes, SchemeRule, effective_bits, parse_scheme
from lrq_deploy.quant.scheme import QuantScheme

__all__ = ["DEFAULT_CANDIDATES", "SEARCH_SAMPLES", "Searched", "candidate_schemes", "search_schemes"]

DEFAULT_CANDIDATES = ("w2a16-g64", "w3a16", "w3a16-g64", "w4a16", "w4a16-g64", "w8a16")
SEARCH_SAMPLES = 8


def candidate_schemes(text: str | None, default: QuantScheme) -> tuple[QuantScheme, ...]:
    """--candidates (comma-separated scheme names) as schemes; weight-only, integer or float grids."""
    names = [n.strip() for n in (text or ",".join(DEFAULT_CANDIDATES)).split(",") if n.strip()]
    schemes = tuple(dict.fromkeys(parse_scheme(name, default) for name in names))
    if None in schemes or len(schemes) < 2:
        raise LrqError(f"--candidates {text!r}: give at least two schemes (none is not a candidate)")
    active = [s.name for s in schemes if s.quantize_activations]
    if active:
        raise LrqError(f"--candidates: the bit-budget search chooses weight-only schemes; {', '.join(active)} "
                       "quantize activations")
    return schemes


@dataclass
class Searched:
    name: str
    params: int
    bits: dict[str, float]  # candidate name -> effective bits
    errors: dict[str, float]  # candidate name -> relative output error with this linear alone quantized
    chosen: str = ""


def searchable_linears(loaded, schemes: LayerSchemes, head: str | None) -> dict[str, nn.Linear]:
    """The linears the search chooses for: every block linear (and the head, when it is quantized) that no
    given rule covers."""
    found = block_linears(loaded)
    if head is not None:
        found[head] = loaded.model.get_submodule(head)
    return {name: linear for name, linear in found.items() if schemes.rule_for(name) is None}


def check_budget(linears: dict[str, nn.Linear], budget) -> None:
    """One line, before any forward pass, for a budget no assignment of candidates can meet."""
    if not linears:
        raise LrqError("--effective-bits: every linear already has a scheme from a rule; nothing is left to search")
    unfit = [name for name, l in linears.items() if not any(_divides(c, l.in_features) for c in budget.candidates)]
    if unfit:
        raise LrqError(f"--candidates: no candidate's group size divides the input size "
                       f"{linears[unfit[0]].in_features} of {unfit[0]}; add a candidate that fits it (per channel, say)")
    params = sum(l.weight.numel() for l in linears.values())
    lowest = sum(min(effective_bits(c, l.in_features) for c in budget.candidates if _divides(c, l.in_features))
                 * l.weight.numel() for l in linears.values()) / params
    if budget.bits < lowest:
        raise LrqError(f"--effective-bits {budget.bits:g} is below the smallest the candidates reach on this model "
                       f"({lowest:.3f} bits per weight, every linear at its cheapest candidate)")


def _divides(scheme: QuantScheme, in_features: int) -> bool:
    """Whether the scheme's weight groups fit this input size."""
    try:
        scheme.group_length(in_features)
    except LrqError:
        return False
    return True


@torch.no_grad()
def search_schemes(loaded, schemes: LayerSchemes, batches: list, head: str | None) -> tuple[LayerSchemes, dict]:
    """The budget's choice as rules after the given ones, and the search's record for the manifest."""
    budget = schemes.budget
    linears = searchable_linears(loaded, schemes, head)
    check_budget(linears, budget)
    samples = _stacked(batches[:SEARCH_SAMPLES])
    reference = _outputs(loaded, samples)
    rows = []
    with step(f"measuring the sensitivity of {len(linears)} linears to {len(budget.candidates)} schemes"):
        for name, linear in linears.items():
            row = Searched(name, linear.weight.numel(), {}, {})
            for candidate in budget.candidates:
                if not _divides(candidate, linear.in_features):
                    continue
                row.bits[candidate.name] = effective_bits(candidate, linear.in_features)
                row.errors[candidate.name] = _error_with(loaded, linear, candidate, samples, reference)
            rows.append(row)
    _choose(rows, budget.bits)
    by_name = {c.name: c for c in budget.candidates}
    rules = tuple(SchemeRule(row.name, by_name[row.chosen]) for row in rows)
    total = sum(row.params for row in rows)
    record = {"effective_bits": budget.bits,
              "achieved_bits": round(sum(row.bits[row.chosen] * row.params for row in rows) / total, 4),
              "samples": min(len(batches), SEARCH_SAMPLES), "table": [vars(row) for row in rows]}
    return replace(schemes, rules=schemes.rules + rules), record


BUDGET_STEPS = 4096  # the budget's resolution in the knapsack (each linear's cost rounded up to a step)


def _choose(rows: list[Searched], target: float) -> None:
    """The multiple-choice knapsack solved exactly by dynamic programming over the budget in BUDGET_STEPS
    steps: the least summed error whose bits (weighted by parameters, rounded up per linear) fit."""
    import numpy as np

    step_bits = target * sum(row.params for row in rows) / BUDGET_STEPS
    best = np.zeros(BUDGET_STEPS + 1)  # least error of the rows so far within b steps
    picks = []
    for row in rows:
        names = list(row.bits)
        costs = [int(np.ceil(row.bits[c] * row.params / step_bits - 1e-9)) for c in names]
        options = np.full((len(names), BUDGET_STEPS + 1), np.inf)
        for i, (name, cost) in enumerate(zip(names, costs)):
            if cost <= BUDGET_STEPS:
                options[i, cost:] = best[: BUDGET_STEPS + 1 - cost] + row.errors[name]
        picks.append((names, costs, options.argmin(axis=0)))
        best = options.min(axis=0)
    if not np.isfinite(best[-1]):
        raise LrqError("--effective-bits: no choice of candidates fits the budget")
    remaining = BUDGET_STEPS
    for row, (names, costs, pick) in zip(reversed(rows), reversed(picks)):
        choice = int(pick[remaining])
        row.chosen = names[choice]
        remaining -= costs[choice]


def _error_with(loaded, linear: nn.Linear, scheme: QuantScheme, samples: list, reference: list) -> float:
    grid = weight_grid(scheme)
    original = linear.weight.data
    weight = original.float()
    linear.weight.data = grid.fake_quant(weight, grid.qparams(weight)).to(original.dtype)
    try:
        outputs = _outputs(loaded, samples)
    finally:
        linear.weight.data = original
    change = sum((o - r).double().pow(2).sum() for o, r in zip(outputs, reference))
    return float(change / sum(r.double().pow(2).sum() for r in reference))


def _outputs(loaded, samples: list) -> list[torch.Tensor]:
    """The model's main output (logits, last hidden state or the tensor it returns) per sample."""
    seen: list[torch.Tensor] = []
    handle = loaded.model.register_forward_hook(lambda _m, _a, out: seen.append(_main_tensor(out).float()))
    device = next(loaded.model.parameters()).device
    try:
        for sample in samples:
            loaded.adapter.forward_for_capture(loaded.model, to_device(sample, device))
    finally:
        handle.remove()
    return seen


def _stacked(samples: list) -> list:
    """Samples of one shape as one batch (one forward pass per candidate instead of one per sample)."""
    if all(isinstance(s, torch.Tensor) for s in samples) and len({s.shape[1:] for s in samples}) == 1:
        return [torch.cat(samples)]
    return samples


def _main_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return next(v for v in (out.values() if isinstance(out, dict) else out) if isinstance(v, torch.Tensor))
