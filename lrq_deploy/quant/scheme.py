"""QuantScheme: a quantized layer's numerics as every deployment stage needs them, derived once.

The torch kernel backend, ONNX lowering and both kinds of TensorRT plugin ask the scheme which
kernel family serves a layer (`kernel`) and how long a weight group is (`group_length`);
nothing else encodes those rules. Group size has one meaning everywhere: `None` is one group
per output channel; kernels receive the group's length, which always divides K. ONNX node
attributes spell per-channel as 0 (attributes cannot be None), converted here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.pack import container_bits

__all__ = ["KernelFamily", "QuantScheme", "group_from_attr", "group_length", "kernel_schemes"]


class KernelFamily(str, Enum):
    WEIGHT_ONLY = "weight_only"  # float activations x 2/3/4-bit weights (in 2- or 4-bit containers)
    INTEGER = "integer"  # per-token integer activations x 3/4/6/8-bit weights, exact int32 sums


WEIGHT_ONLY_BITS = (2, 3, 4)
INTEGER_WEIGHT_BITS = (3, 4, 6, 8)
INTEGER_ACT_BITS = (4, 6, 8)


@dataclass(frozen=True)
class QuantScheme:
    wbits: int
    abits: int
    group_size: int | None = None  # None: per output channel
    symmetric: bool = False
    act_asym: bool = False  # per-token activation zero points (integer kernels: a correction in the epilogue)

    @classmethod
    def from_config(cls, config) -> "QuantScheme":
        return cls(config.wbits, config.abits, config.group_size, config.symmetric, config.act_asym)

    @classmethod
    def from_attrs(cls, attrs: dict) -> "QuantScheme":
        """From an lrq ONNX node's attributes (group_size 0 = per channel; act_asym absent = 0)."""
        return cls(int(attrs["wbits"]), int(attrs["abits"]), group_from_attr(attrs["group_size"]),
                   bool(attrs.get("symmetric", 0)), bool(attrs.get("act_asym", 0)))

    @property
    def group_attr(self) -> int:
        """The group size as an ONNX attribute: 0 for per channel."""
        return self.group_size or 0

    @property
    def scenario(self) -> str:
        return (f"W{self.wbits}A{self.abits}" + (f"-g{self.group_size}" if self.group_size else "")
                + ("-asym" if self.act_asym else ""))

    @property
    def container_bits(self) -> int:
        return container_bits(self.wbits)

    @property
    def kernel(self) -> KernelFamily | None:
        """The kernel family serving this scheme, or None (reference arithmetic only)."""
        if self.abits == 16 and self.wbits in WEIGHT_ONLY_BITS:
            return KernelFamily.WEIGHT_ONLY
        if self.abits in INTEGER_ACT_BITS and self.wbits in INTEGER_WEIGHT_BITS:
            return KernelFamily.INTEGER
        return None

    def require_kernel(self) -> KernelFamily:
        if self.kernel is None:
            raise LrqError(
                f"no kernel for {self.scenario} (kernels: weight-only W2/W3/W4 with 16-bit activations; "
                "W3/W4/W6/W8 weights with 4/6/8-bit activations); use the reference backend"
            )
        return self.kernel

    @property
    def plugin_name(self) -> str:
        """The TensorRT plugin / lrq ONNX node type of this scheme."""
        return f"W{self.wbits}A{self.abits}Linear"

    def group_length(self, in_features: int) -> int:
        return group_length(self.group_size, in_features)

    def groups(self, in_features: int) -> int:
        return in_features // self.group_length(in_features)


def group_from_attr(value: int) -> int | None:
    """An ONNX attribute's group size (0 = per channel) as the scheme spells it."""
    return int(value) or None


def group_length(group_size: int | None, in_features: int) -> int:
    """Input channels per weight group (in_features for per-channel weights); refuses a group
    size that does not divide in_features. The one place a group size becomes a length."""
    group = group_size or in_features
    if in_features % group:
        raise LrqError(f"group size {group} does not divide in_features = {in_features}")
    return group


def kernel_schemes() -> list[tuple[int, int]]:
    """Every (wbits, abits) that some kernel serves, for plugin registration."""
    pairs = [(w, 16) for w in WEIGHT_ONLY_BITS] + [(w, a) for w in INTEGER_WEIGHT_BITS for a in INTEGER_ACT_BITS]
    return sorted(pairs)
