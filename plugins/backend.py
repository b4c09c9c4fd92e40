"""The kernel-backed torch backend: QuantLinear layers running the Triton kernels."""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy.quant import QuantLinear


class KernelLinear(nn.Module):
    """A QuantLinear's buffers, read by the kernels as they are (ops.kernel_words)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.scheme = layer.config
        self.family = self.scheme.require_kernel()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        for name in ("qweight", "scales", "zeros", "bias"):
            self.register_buffer(name, getattr(layer, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops

        return ops.scheme_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.scheme, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.name}, {self.family.value}"


def use_kernels(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear of `model` by a KernelLinear, in place (refused as a whole when
    one layer has no kernel)."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for _, module in targets:
        module.config.require_kernel()
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, KernelLinear(module))
    return model


__all__ = ["KernelLinear", "use_kernels"]
