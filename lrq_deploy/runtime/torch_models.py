"""Torch targets for running: a quantized checkpoint (reference backend, or the Triton kernels
where they serve its scheme) or a full-precision model (HF / timm directory, bundled name)."""

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
        served = kernels == "auto" and device.type == "cuda" and ckpt.scheme.kernel is not None
    if served:
        from lrq_deploy.plugins.backend import use_kernels

        use_kernels(ckpt.model)
    return TorchTarget(ckpt, "Triton kernels" if served else "reference dequantize + matmul")
