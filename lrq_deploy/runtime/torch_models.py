"""Torch targets for running: a quantized checkpoint (reference backend, or the Triton kernels
where they serve its scheme) or a full-precision model (HF / timm directory, bundled name), and
TorchSession: such a model run as its deployment graph (verification, bench)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lrq_deploy.checkpoint import Checkpoint
from lrq_deploy.errors import LrqError

KERNEL_CHOICES = ("auto", "require", "never")


@dataclass
class TorchTarget:
    checkpoint: Checkpoint  # quant None: a full-precision model
    path_name: str  # how it runs, for reports: "full precision", "Triton kernels", "reference dequantize + matmul"

    @property
    def loaded(self):
        return self.checkpoint.loaded


def load_torch_target(target, device, kernels: str = "auto", checkpoint: bool = False) -> TorchTarget:
    """kernels: "auto" puts a checkpoint on the Triton kernels on CUDA where they serve its
    scheme; "require" on any device (Triton's interpreter on CPU), refused when no kernel
    serves the scheme; "never" keeps the reference QuantLinear arithmetic. With checkpoint=True
    anything but a checkpoint is refused with the checkpoint loader's words."""
    from lrq_deploy.checkpoint import load_checkpoint, load_source

    if kernels not in KERNEL_CHOICES:
        raise LrqError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    ckpt = load_checkpoint(Path(target), device) if checkpoint else load_source(target, device)
    if ckpt.quant is None:
        return TorchTarget(ckpt, "full precision")
    if kernels == "require":
        ckpt.scheme.require_kernel()
        served = True
    else:
        served = kernels == "auto" and device.type == "cuda" and ckpt.scheme.kernel is not None and _kernels_run(ckpt, device)
    if served:
        from lrq_deploy.plugins.backend import use_kernels

        use_kernels(ckpt.model)
    return TorchTarget(ckpt, "Triton kernels" if served else "reference dequantize + matmul")


def _kernels_run(ckpt, device) -> bool:
    from lrq_deploy.plugins.backend import kernels_run

    return kernels_run(ckpt.scheme, device)


class TorchSession:
    """A loaded model run as its deployment graph would be: inputs and outputs named by the
    adapter's graph_io, the module from its export spec (logits; with past: keys/values too);
    batch / seq_len fix the traced shapes where the adapter needs them."""

    def __init__(self, loaded, device, with_past: bool = False, batch: int | None = None, seq_len: int | None = None):
        self.loaded, self.device = loaded, device
        self.io = loaded.adapter.graph_io(loaded.model, with_past)
        self.module = loaded.adapter.export_spec(loaded.model, batch, seq_len, with_past).module.eval()

    def input_specs(self) -> list:
        return list(self.io.inputs)

    def call(self, tensors: list):
        """The module on input tensors in graph_io order; returns its outputs as a tuple."""
        args = (tensors[0], tuple(tensors[1:])) if self.io.kv_cache else tuple(tensors)
        out = self.module(*args)
        return out if isinstance(out, tuple) else (out,)

    def run(self, feeds: dict) -> dict:
        import numpy as np
        import torch

        tensors = [torch.from_numpy(np.asarray(feeds[n])).to(self.device) for n in self.io.input_names]
        with torch.no_grad():
            outputs = self.call(tensors)
        return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in zip(self.io.output_names, outputs)}
