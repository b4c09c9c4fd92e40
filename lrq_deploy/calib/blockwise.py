"""The block-wise calibration loop shared by every method.

For each transformer block in order: compute its full-precision output on full-precision
inputs (the target), let the method quantize the block in place (seeing the inputs produced
by the already-quantized blocks before it), then feed the quantized block's output to the
next block. Methods come from the registry (calib/registry.py).
"""

from __future__ import annotations

import gc
import tempfile
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrq_deploy.calib.distributed import SINGLE, Collective
from lrq_deploy.calib.rundir import RunDir
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.layer_schemes import LayerSchemes
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import LoadedModel, ModelAdapter, SmoothGroup
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.grids import input_scale_of
from lrq_deploy.quant.kv_cache import calibrate_kv_scales, kv_quantization_off
from lrq_deploy.rotate import online_modules


@dataclass
class BlockJob:
    """Everything a method needs to quantize one block."""

    index: int
    block: nn.Module
    adapter: ModelAdapter
    groups: list[SmoothGroup]
    linear_names: list[str]
    qconfig: QuantScheme
    cconfig: CalibConfig
    fp_inputs: torch.Tensor
    q_inputs: torch.Tensor
    fp_targets: torch.Tensor
    kwargs: dict
    device: torch.device
    run_dir: "RunDir | None" = None
    epoch_progress: Callable[[int, float], None] | None = None
    collective: Collective = SINGLE  # the other calibration ranks (data parallel), if any
    total_samples: int | None = None  # over all ranks (default: this rank's)
    schemes: dict[str, QuantScheme] = field(default_factory=dict)  # linears a rule gives another scheme than qconfig
    held_out: "HeldOut | None" = None  # windows never trained on (CalibConfig.held_out_samples), every rank's same

    def validation(self) -> "HeldOut":
        """Where a choice among finished candidates is judged: the held-out windows when drawn,
        else the calibration windows themselves."""
        return self.held_out or HeldOut(self.q_inputs, self.fp_targets, "calibration")

    def scheme(self, name: str) -> QuantScheme:
        """The scheme of one of the block's linears."""
        return self.schemes.get(name, self.qconfig)

    @property
    def linear_schemes(self) -> dict[str, QuantScheme]:
        return {name: self.scheme(name) for name in self.linear_names}

    @property
    def quantizes_weights(self) -> bool:
        return any(s.quantize_weights for s in self.linear_schemes.values())

    @property
    def quantizes_activations(self) -> bool:
        return any(s.quantize_activations for s in self.linear_schemes.values())

    @property
    def options(self):
        """The method's own settings (its options dataclass)."""
        return self.cconfig.options

    @property
    def samples(self) -> int:
        return self.total_samples or len(self.q_inputs)

    def run(self, hidden: torch.Tensor, block: nn.Module | None = None, grad: bool = False) -> torch.Tensor:
        return run_block(self.adapter, block or self.block, hidden, self.kwargs, self.cconfig.batch_size, grad, self.device)


@dataclass
class HeldOut:
    """Block inputs through the quantized blocks before, and the full-precision block's outputs."""

    q_inputs: torch.Tensor
    fp_targets: torch.Tensor
    source: str = "held-out"

    def error(self, job: BlockJob) -> float:
        """The block's output MSE here, as it stands in job.block."""
        collective = SINGLE if self.source == "held-out" else job.collective  # held-out: the same on every rank
        return block_errors(self.fp_targets, job.run(self.q_inputs), collective)["mse"]


@dataclass
class CalibrationResult:
    model: nn.Module
    quantized: list[str]
    blocks: list[dict] = field(default_factory=list)


def run_block(adapter, block, hidden, kwargs, batch_size, grad=False, device=None) -> torch.Tensor:
    """Run a block over all samples in chunks; chunks move to `device` and results back to where
    `hidden` lives (the CPU when block inputs are offloaded)."""
    outs = []
    with torch.set_grad_enabled(grad):
        for chunk in hidden.split(batch_size):
            outs.append(adapter.run_block(block, chunk.to(device or chunk.device), kwargs).to(hidden.device))
    return torch.cat(outs)


def to_device(value, device):
    """Move tensors inside (nested) tuples / lists / dicts of block keyword arguments."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@contextmanager
def outside_blocks_on(model: nn.Module, blocks, device: torch.device):
    """Everything of `model` but its blocks (embeddings, rotary tables, final norm, head) on
    `device` for the duration, then back where it was. Block inputs are therefore captured on
    the calibration device whether or not blocks are offloaded: the block-0 inputs (embeddings,
    rotary cos/sin) are computed by the same kernels in both modes, so offloading cannot change
    the arithmetic (CPU and CUDA cos/sin differ in the last bits)."""
    in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    moved = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in in_blocks and tensor.device != device:
                    moved.append((table, name, tensor))
                    table[name] = _moved(tensor, device)
    try:
        yield
    finally:
        for table, name, tensor in moved:
            table[name] = tensor


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.data.to(device), requires_grad=tensor.requires_grad)
    return tensor.to(device)


def block_schemes(model: nn.Module, adapter: ModelAdapter, block: nn.Module, schemes: LayerSchemes) -> dict:
    """The scheme of each of the block's linears by its full name (None: kept in floating point)."""
    prefix = _block_prefix(model, block)
    return {name: schemes.for_module(f"{prefix}.{name}") for name in adapter.linear_names(block)}


def block_linears(loaded: LoadedModel) -> dict[str, nn.Module]:
    """Every block linear the adapter quantizes, by its full module name."""
    return {f"{_block_prefix(loaded.model, block)}.{name}": block.get_submodule(name)
            for block in loaded.adapter.blocks(loaded.model) for name in loaded.adapter.linear_names(block)}


def check_shapes(loaded: LoadedModel, schemes: LayerSchemes) -> None:
    """Fail before any work if a linear cannot be quantized with its scheme."""
    for i, block in enumerate(loaded.adapter.blocks(loaded.model)):
        for name, scheme in block_schemes(loaded.model, loaded.adapter, block, schemes).items():
            in_features = block.get_submodule(name).in_features
            if scheme is not None and scheme.group_size and in_features % scheme.group_size:
                raise LrqError(
                    f"group size {scheme.group_size} does not divide the input size {in_features} of block {i} {name}"
                )


def block_errors(fp_out: torch.Tensor, q_out: torch.Tensor, collective: Collective = SINGLE) -> dict:
    """MSE and mean per-token cosine of q_out against fp_out, over the samples of every rank."""
    fp, q = fp_out.double(), q_out.double()
    cosines = F.cosine_similarity(q.reshape(-1, fp_out.shape[-1]), fp.reshape(-1, fp_out.shape[-1]), dim=-1)
    sums = collective.sum(torch.stack([(q - fp).pow(2).sum(), torch.tensor(float(fp.numel()), dtype=torch.float64,
                                                                            device=fp.device),
                                       cosines.sum(), torch.tensor(float(cosines.numel()), dtype=torch.float64,
                                                                   device=fp.device)]))
    return {"mse": (sums[0] / sums[1]).item(), "cosine": (sums[2] / sums[3]).item()}


def calibrate_model(
    loaded: LoadedModel, qconfig: QuantScheme | LayerSchemes, cconfig: CalibConfig, batches: list[torch.Tensor], device,
    progress=None, run_dir: RunDir | None = None, offload: bool | str = False, collective: Collective = SINGLE,
    held_out: list[torch.Tensor] = (),
) -> CalibrationResult:
    """Quantize `loaded.model` in place, block by block; return per-block errors.

    offload: the model and the block inputs/outputs stay in CPU memory and each block visits
    `device` only while it is calibrated, so the GPU holds one block and one batch at a time;
    "disk" also keeps the block inputs/outputs in files (the kernel pages them in and out).
    qconfig: one scheme, or per-layer schemes (quant/layer_schemes.py).
    held_out: windows that go through the blocks beside the calibration windows, never trained on,
    where a method judges its candidates (BlockJob.held_out).
    """
    if isinstance(qconfig, QuantScheme):
        qconfig = LayerSchemes(qconfig)
    with _activation_store(offload) as keep:
        return _calibrate_blocks(loaded, qconfig, cconfig, batches, device, progress, run_dir, offload, collective, keep,
                                 list(held_out))


def _calibrate_blocks(loaded, schemes: LayerSchemes, cconfig, batches, device, progress, run_dir, offload, collective,
                      keep, held_out):
    method = cconfig.spec.quantize_block
    adapter, model = loaded.adapter, loaded.model
    qconfig = schemes.default
    check_shapes(loaded, schemes)
    torch.manual_seed(cconfig.seed)
    device = torch.device(device)
    blocks = adapter.blocks(model)
    batches = list(batches)
    with outside_blocks_on(model, blocks, device):
        first = adapter.capture_block_inputs(model, to_device(list(batches[:1]), device))
        check_activation_memory(first.hidden.nbytes * len(batches) // collective.world, device, offload)
        inputs = adapter.capture_block_inputs(model, to_device(list(batches), device))
        held = adapter.capture_block_inputs(model, to_device(held_out, device)).hidden if held_out else None
    on_device: dict[int, dict] = {}  # one copy per distinct kwargs dict (blocks of one layer type share it)
    hidden = collective.shard(inputs.hidden)  # this rank's samples (all of them in one process)
    fp_in = q_in = keep(hidden.cpu()) if offload else hidden.to(device)
    held_fp = held_q = None if held is None else (keep(held.cpu()) if offload else held.to(device))
    groups = smoothable_groups(adapter.smooth_groups(model), blocks[0])
    result = CalibrationResult(model=model, quantized=[])
    for index, block in enumerate(blocks):
        if loaded.materialize:  # a lazily loaded model: this block's weights are read now
            loaded.materialize(block)
        block.to(device)
        own = inputs.kwargs_for(index)
        if id(own) not in on_device:
            on_device[id(own)] = to_device(own, device)
        kwargs = on_device[id(own)]
        with kv_quantization_off(block):  # the full-precision reference keeps a float cache
            fp_out = keep(run_block(adapter, block, fp_in, kwargs, cconfig.batch_size, device=device))
            if held is not None:
                held_fp = keep(run_block(adapter, block, held_fp, kwargs, cconfig.batch_size, device=device))
        own_schemes = {n: s for n, s in block_schemes(model, adapter, block, schemes).items() if s is not None}
        names = list(own_schemes)
        job = BlockJob(
            index, block, adapter, groups, names, qconfig, cconfig, fp_in, q_in, fp_out, kwargs,
            device, run_dir, progress.epoch if progress else None, collective, len(inputs.hidden),
            {n: s for n, s in own_schemes.items() if s != qconfig},
            None if held is None else HeldOut(held_q, held_fp),
        )
        calibrate_kv_scales(block, lambda: job.run(job.q_inputs), collective.max)  # before the method trains with them
        ratios = outlier_ratios(job)
        extra = (method(job) or {}) if names else {}
        calibrate_input_scales(job)
        q_out = keep(run_block(adapter, block, q_in, kwargs, cconfig.batch_size, device=device))
        if held is not None:
            held_q = keep(run_block(adapter, block, held_q, kwargs, cconfig.batch_size, device=device))
        for module in block.modules():  # a finished block keeps only its packed codes
            if isinstance(module, QuantLinear):
                module.drop_cache()
        gc.collect()  # release the replaced float linears now, whatever reference cycles they are in
        if offload:
            block.cpu()
        if collective.max(torch.tensor(0.0 if torch.isfinite(q_out).all() else 1.0)).item():  # on any rank
            raise LrqError(f"block {index}: quantized output contains NaN or inf")
        report = {"block": index, **block_errors(fp_out, q_out, collective), **extra, "input_ratios": ratios}
        result.blocks.append(report)
        prefix = _block_prefix(model, block)
        result.quantized.extend(f"{prefix}.{n}" for n in names)
        if progress:
            progress.block_done(report, len(blocks))
        fp_in, q_in = fp_out, q_out
    return result


@torch.no_grad()
def outlier_ratios(job: BlockJob) -> dict[str, dict[str, float]]:
    """Per linear input over the calibration inputs (the block as yet unquantized): the largest
    channel's |max| over the median channel's, and the largest token's over the median token's.
    A large channel ratio is what smoothing moves into the weights; a large token ratio, a tail a
    channel scale cannot flatten, is what a rotation spreads (--rotate)."""
    channel: dict[str, torch.Tensor] = {}
    tokens: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in job.linear_names:
        def hook(_module, args, name=name):
            flat = args[0].detach().flatten(0, -2).float().abs()
            cmax = flat.amax(dim=0)
            channel[name] = torch.maximum(channel[name], cmax) if name in channel else cmax
            tokens.setdefault(name, []).append(flat.amax(dim=1).cpu())

        handles.append(job.block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        job.run(job.q_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"channel": _max_over_median(job.collective.max(channel[name]).cpu()),
                   "token": _max_over_median(torch.cat(tokens[name]))} for name in channel}


def _max_over_median(values: torch.Tensor) -> float:
    return round(float(values.max() / values.median().clamp_min(1e-12)), 2)


def smoothable_groups(groups: list[SmoothGroup], block: nn.Module) -> list[SmoothGroup]:
    """The smoothing groups whose scale still folds: none into a linear whose input is rotated
    online (a channel scale of the producer does not commute with the rotation)."""
    online = online_modules(block)
    return [g for g in groups if not online.keys() & set(g.linears)]


@torch.no_grad()
def calibrate_input_scales(job: BlockJob) -> None:
    """Set the static input scale of the block's float-grid linears from the largest |input| each
    receives over the calibration inputs (all ranks), the block quantized as the method left it."""
    layers = {name: job.block.get_submodule(name) for name in job.linear_names}
    layers = {name: layer for name, layer in layers.items()
              if getattr(layer, "input_scale", None) is not None and job.scheme(name).quantize_activations}
    if not layers:
        return
    amax: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, name=name: amax.__setitem__(name, torch.maximum(
            amax.get(name, torch.zeros((), device=args[0].device)), args[0].detach().abs().amax().float())))
        for name, layer in layers.items()]
    try:
        job.run(job.q_inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        layer.tensor_scales[1] = input_scale_of(job.collective.max(amax[name]), job.scheme(name))


ACTIVATION_COPIES = 4  # block inputs and outputs, full precision and quantized, alive at once


def check_activation_memory(sample_bytes: int, device: torch.device, offload: bool | str) -> None:
    """Refuse a calibration set whose block activations cannot fit where they are kept, before
    any block runs (an allocation error after minutes of work otherwise)."""
    if offload == "disk":
        return
    need = sample_bytes * ACTIVATION_COPIES
    on_gpu = device.type == "cuda" and not offload
    available = torch.cuda.mem_get_info(device)[0] if on_gpu else available_memory()
    if available is not None and need > available:
        where = "GPU memory" if on_gpu else "memory"
        from lrq_deploy.atomic import human_size

        raise LrqError(f"the calibration set needs about {human_size(need)} of {where} for block activations "
                       f"({ACTIVATION_COPIES} copies of every sample's hidden states), {human_size(available)} is "
                       "available: use fewer --nsamples, a shorter --seq-len, or --offload disk")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextmanager
def _activation_store(offload: bool | str):
    """keep(tensor) -> the tensor where block activations live: as it is, or (offload "disk") in an
    unlinked file mapped into memory, so the kernel can write it out and read it back as needed."""
    if offload != "disk":
        yield lambda tensor: tensor
        return
    with tempfile.TemporaryDirectory(prefix="lrq-activations-") as directory:
        count = iter(range(1 << 30))

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            path = Path(directory) / f"{next(count)}.bin"
            mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
            path.unlink()  # the mapping keeps the file's blocks until the tensor is freed
            return mapped.view(tensor.shape).copy_(tensor)

        yield keep


def _block_prefix(model: nn.Module, block: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is block:
            return name
    raise LrqError("block is not part of the model")
