"""The output head (an LM's lm_head, a classifier's head) quantized like the blocks' linears, with
the scheme of the blocks and the method's own weight rounding (calibrate --quantize-head).

At a real vocabulary the head is the largest matrix a decoder reads per token (32000 x 4096 in
a 7B LLaMA: more bytes than its four attention projections together), so a low-bit deployment
that keeps it in float reads most of its bytes there. A head tied to the input embeddings is
untied: the embeddings stay in full precision (a lookup reads one row per token), the head gets
its own codes, and the model's config records the untying."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lrq_deploy.calib.baselines import quantize_linear
from lrq_deploy.calib.distributed import SINGLE, Collective
from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import replace_module
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.rotate import untie_head


@dataclass
class HeadJob:
    """What a method's head rounding gets: the float head, the scheme, the method's options, and
    the head's inputs over the calibration set (computed when first asked for)."""

    linear: nn.Linear
    qconfig: QuantScheme
    options: Any
    collective: Collective
    capture: Callable[[], torch.Tensor]  # -> inputs [rows, in_features] of this rank
    _inputs: torch.Tensor | None = None

    @property
    def inputs(self) -> torch.Tensor:
        if self._inputs is None:
            self._inputs = self.capture()
        return self._inputs

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n sum x x^T over every rank's head inputs (float64 sums)."""
        x = self.inputs.double()
        total = self.collective.sum(torch.cat([(x.T @ x).flatten(), x.new_tensor([len(x)])]))
        return (2 * total[:-1].view(x.shape[1], x.shape[1]) / total[-1]).float()


def round_to_nearest(job: HeadJob) -> QuantLinear:
    return quantize_linear(job.linear, job.qconfig)


def gptq_rounding(job: HeadJob, damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                  clip: str = "mse") -> QuantLinear:
    """GPTQ rounding of the head on its calibration inputs (scales by the `clip` rule, calib/gptq.py)."""
    from lrq_deploy.calib.gptq import gptq_quantize

    if not job.qconfig.quantize_weights:
        return round_to_nearest(job)
    codes, scale, zero = gptq_quantize(job.linear.weight, job.hessian(), job.qconfig, damp, act_order, block_size,
                                       clip=clip)
    return QuantLinear.from_codes(codes, scale, zero, job.linear.bias, job.qconfig)


def clip_search(job: HeadJob, grid: int = 20) -> QuantLinear:
    """AWQ's per-group clipping search on the head's inputs, then round to nearest (no scale search:
    the head's input norm also feeds nothing else, but a scale there buys little at the last layer)."""
    from lrq_deploy.calib.awq import CLIP_ROWS, search_clip

    if not job.qconfig.quantize_weights:
        return round_to_nearest(job)
    x = job.inputs[torch.linspace(0, len(job.inputs) - 1, min(CLIP_ROWS, len(job.inputs))).long()]
    factor = search_clip(job, job.linear.weight, x, grid, job.qconfig)
    return quantize_linear(job.linear, job.qconfig, factor, factor)


def head_of(loaded) -> tuple[str, nn.Linear]:
    """The model's output head (name, linear); one error line for a model without one."""
    found = loaded.adapter.head(loaded.model)
    if found is None:
        raise LrqError(f"--quantize-head: a {loaded.adapter.family} model has no output head to quantize")
    return found


def quantize_head(loaded, qconfig: QuantScheme, cconfig, batches: list, device: torch.device,
                  collective: Collective = SINGLE) -> str:
    """Replace the model's head by a QuantLinear rounded by the method's head rule; returns its name."""
    name, linear = head_of(loaded)
    model = loaded.model
    untie_head(model, linear)
    rounding = cconfig.spec.quantize_head or round_to_nearest
    job = HeadJob(linear, qconfig, cconfig.options, collective, lambda: _head_inputs(loaded, linear, batches, device))
    replace_module(model, name, rounding(job).to(linear.weight.device))
    return name


@torch.no_grad()
def _head_inputs(loaded, head: nn.Linear, batches: list, device: torch.device) -> torch.Tensor:
    """The head's inputs over the calibration batches, through the model as quantized so far
    (its blocks already replaced), as the deployed head will see them."""
    rows = []
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach().flatten(0, -2).float().cpu()))
    model_device = next(loaded.model.parameters()).device
    try:
        loaded.model.to(device)
        for batch in batches:
            loaded.adapter.forward_for_capture(loaded.model, _to(batch, device))
    finally:
        handle.remove()
        loaded.model.to(model_device)
    if not rows:
        raise LrqError("--quantize-head: the head received no calibration input")
    return torch.cat(rows).to(device)


def _to(batch, device):
    return tuple(_to(b, device) for b in batch) if isinstance(batch, (tuple, list)) else batch.to(device)
