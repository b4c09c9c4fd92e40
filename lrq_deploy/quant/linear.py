"""QuantLinear: the deployed form of a quantized linear layer (reference torch backend).

Its state dict *is* the checkpoint format: packed weight codes, float16 scales, uint8 zero
points, optional bias. The forward pass dequantizes with the reference formula and applies
per-token activation fake quantization when abits < 16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrq_deploy.quant.pack import container_bits, pack_codes, unpack_codes
from lrq_deploy.quant.scheme import QuantScheme, group_length
from lrq_deploy.quant.primitives import dequantize_weight, fake_quant_activation


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantScheme):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.group_size = config.group_size
        if config.quantize_weights:
            groups = in_features // group_length(config.group_size, in_features)
            packed = in_features * container_bits(config.wbits) // 8
            self.register_buffer("qweight", torch.zeros(out_features, packed, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._dequantized: torch.Tensor | None = None
        self.graph_op = False  # set by the ONNX exporter: forward through the lrq::quant_linear op

    @classmethod
    def from_codes(cls, codes, scales, zeros, bias, config: QuantScheme) -> "QuantLinear":
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bias is not None, config)
        layer.qweight.copy_(pack_codes(codes, config.wbits))
        layer.scales.copy_(scales.to(torch.float16))
        layer.zeros.copy_(zeros.to(torch.uint8))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_float(cls, weight, bias, config: QuantScheme) -> "QuantLinear":
        """Activation-only quantization (wbits=16): weights stay in floating point."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, config)
        layer.weight = weight.detach().clone()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.config.wbits)[:, : self.in_features]

    def dequantized_weight(self) -> torch.Tensor:
        if not self.config.quantize_weights:
            return self.weight
        if self._dequantized is None or self._dequantized.device != self.qweight.device:
            self._dequantized = dequantize_weight(self.codes(), self.scales, self.zeros, self.group_size)
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
        if self.config.quantize_activations:
            x = fake_quant_activation(x, self.config.abits, self.config.act_asym)
        weight = self.dequantized_weight()
        bias = self.bias
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        from lrq_deploy.quant.op import quant_linear

        cfg = self.config
        if cfg.quantize_weights:
            weight, scales, zeros = self.qweight, self.scales, self.zeros
        else:
            weight, scales, zeros = self.weight, self.weight.new_ones(1), self.weight.new_zeros(1, dtype=torch.uint8)
        return quant_linear(x, weight, scales, zeros, self.bias, *cfg.to_attributes().values(),
                            self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.config.name}"
