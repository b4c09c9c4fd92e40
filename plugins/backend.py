"""The kernel-backed torch backend: QuantLinear layers running the Triton kernels."""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy.errors import LrqError
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.pack import container_bits


def kernel_for(config) -> str:
    """Which kernel serves a layer configuration ("weight_only" or "w4a4"), or a clear error."""
    if config.wbits in (2, 3, 4) and config.abits == 16:
        return "weight_only"
    if config.wbits == 4 and config.abits == 4:
        return "w4a4"
    raise LrqError(f"no Triton kernel for {config.scenario} yet (kernels: W4A16, W3A16, W2A16, W4A4); use the reference backend")


class KernelLinear(nn.Module):
    """Same buffers as QuantLinear (the checkpoint layout is the kernel layout)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.config = layer.config
        self.kind = kernel_for(layer.config)
        self.bits = container_bits(layer.config.wbits)
        self.group_size = layer.config.group_size or 0
        self.in_features, self.out_features = layer.in_features, layer.out_features
        for name in ("qweight", "scales", "zeros", "bias"):
            self.register_buffer(name, getattr(layer, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops

        if self.kind == "w4a4":
            return ops.w4a4_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.group_size)
        return ops.weight_only_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size)


def use_kernels(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear of `model` by a KernelLinear, in place."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for name, module in targets:
        kernel_for(module.config)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, KernelLinear(module))
    return model


__all__ = ["KernelLinear", "kernel_for", "use_kernels"]
