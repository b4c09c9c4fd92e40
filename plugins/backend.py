"""The kernel-backed torch backend: QuantLinear layers running the Triton kernels."""

from __future__ import annotations

import torch
from torch import nn

from lrq_deploy.errors import LrqError
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.scheme import KernelFamily, QuantScheme


class KernelLinear(nn.Module):
    """A QuantLinear's buffers, read by the kernels as they are (ops.kernel_words)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.scheme = layer.config
        self.family = self.scheme.require_kernel()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        for name, value in zip(("qweight", "scales", "zeros"), layer.weight_tensors()):
            self.register_buffer(name, value)  # zeros: a float grid's tensor_scales
        self.register_buffer("bias", layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops

        return ops.scheme_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.scheme, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.name}, {self.family.value}"


def check_kernels_run(scheme: QuantScheme, device: torch.device) -> None:
    """One clear error when no kernel serves `scheme` on `device` (float grids need FP8 / FP4 hardware)."""
    if scheme.require_kernel() is KernelFamily.FLOAT:
        from .float_ops import check_float_kernel_runs

        check_float_kernel_runs(scheme, device)


def kernels_run(scheme: QuantScheme, device: torch.device) -> bool:
    try:
        check_kernels_run(scheme, device)
    except LrqError:
        return False
    return True


def use_kernels(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear of `model` by a KernelLinear, in place (refused as a whole when
    one layer has no kernel, or its kernel cannot run where the layer is)."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for _, module in targets:
        check_kernels_run(module.config, module.scales.device if module.config.quantize_weights else module.weight.device)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, KernelLinear(module))
    return model


__all__ = ["KernelLinear", "check_kernels_run", "kernels_run", "use_kernels"]
