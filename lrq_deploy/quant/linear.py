"""QuantLinear: the deployed form of a quantized linear layer (reference torch backend).

Its state dict *is* the checkpoint format: packed weight codes and scales with zero points
(integer grids) or tensor-level scales (float grids), in the layout the scheme's grid defines
(quant/grids.py, docs/FORMATS.md), optional bias. The forward pass dequantizes with the reference
formula and quantizes its input as the scheme says (per-token integers, or a float grid with the
layer's calibrated input scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrq_deploy.quant.grids import fake_quant_input, weight_grid
from lrq_deploy.quant.pack import pack_codes, unpack_codes
from lrq_deploy.quant.scheme import QuantScheme


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantScheme):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.group_size = config.group_size
        self.grid = weight_grid(config)
        if config.quantize_weights:
            for name, (shape, dtype) in self.grid.buffers(out_features, in_features).items():
                self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._dequantized: torch.Tensor | None = None
        self.graph_op = False  # set by the ONNX exporter: forward through the lrq::quant_linear op

    @classmethod
    def from_codes(cls, codes, scales, zeros, bias, config: QuantScheme) -> "QuantLinear":
        """From integer codes [out, in] with their scales and zero points."""
        stored = {"qweight": pack_codes(codes, config.wbits), "scales": scales.to(torch.float16),
                  "zeros": zeros.to(torch.uint8)}
        return cls.from_stored(stored, codes.shape[1], bias, config)

    @classmethod
    def from_stored(cls, stored: dict[str, torch.Tensor], in_features: int, bias, config: QuantScheme) -> "QuantLinear":
        """From the buffers the scheme's grid stores (grids.weight_grid(config).stored(...))."""
        layer = cls(in_features, stored["qweight"].shape[0], bias is not None, config)
        for name, value in stored.items():
            getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @property
    def input_scale(self) -> torch.Tensor | None:
        """The calibrated static input scale of a float-grid layer (0 until calibrated), else None."""
        return self.tensor_scales[1] if self.config.float_format else None

    def weight_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros or tensor_scales): the op's weight inputs."""
        return self.qweight, self.scales, getattr(self, self.grid.third)

    @classmethod
    def from_float(cls, weight, bias, config: QuantScheme) -> "QuantLinear":
        """Activation-only quantization (wbits=16): weights stay in floating point."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, config)
        layer.weight = weight.detach().clone()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def codes(self) -> torch.Tensor:
        """Weight codes [out, in], one per byte (integers, or the float grid's bit patterns)."""
        if self.qweight.shape[1] == self.in_features:
            return self.qweight
        return unpack_codes(self.qweight, self.config.wbits)[:, : self.in_features]

    def dequantized_weight(self) -> torch.Tensor:
        if not self.config.quantize_weights:
            return self.weight
        if self._dequantized is None or self._dequantized.device != self.qweight.device:
            self._dequantized = self.grid.dequantize(*self.weight_tensors(), self.in_features)
        return self._dequantized

    def drop_cache(self) -> None:
        """Forget the dequantized weight kept for repeated forwards (as large as the FP weight)."""
        self._dequantized = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph_op:
            return self._graph_forward(x)
        x = fake_quant_input(x, self.config, self.input_scale)
        weight = self.dequantized_weight()
        bias = self.bias
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        from lrq_deploy.quant.op import quant_linear

        cfg = self.config
        if cfg.quantize_weights:
            weight, scales, zeros = self.weight_tensors()
        else:
            weight, scales, zeros = self.weight, self.weight.new_ones(1), self.weight.new_zeros(1, dtype=torch.uint8)
        return quant_linear(x, weight, scales, zeros, self.bias, *cfg.to_attributes().values(),
                            self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.config.name}"
