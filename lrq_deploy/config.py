"""Configuration objects: one source of truth, validated on construction, saved in every artifact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lrq_deploy.errors import LrqError

WEIGHT_BITS = (2, 3, 4, 6, 8, 16)
ACT_BITS = (4, 6, 8, 16)
METHODS = ("rtn", "smoothquant", "omniquant", "lrquant", "lrquant+")


@dataclass(frozen=True)
class QuantConfig:
    """Numerics of a quantized model.

    wbits: weight bits (16 = keep weights in floating point).
    abits: activation bits (16 = keep activations in floating point). Activations are
        quantized per token, dynamically (round half to even): symmetrically (range ±(2^(b-1)-1)),
        or with act_asym over each token's [min, max] with a per-token zero point (quant/primitives.py).
    group_size: weights quantized in groups of this many input channels; None = per output channel.
    symmetric: symmetric weight quantization (zero point fixed at 2^(b-1)); default asymmetric.
    """

    wbits: int = 4
    abits: int = 16
    group_size: int | None = None
    symmetric: bool = False
    act_asym: bool = False

    def __post_init__(self):
        if self.wbits not in WEIGHT_BITS:
            raise LrqError(f"wbits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.wbits}")
        if self.abits not in ACT_BITS:
            raise LrqError(f"abits must be one of {', '.join(map(str, ACT_BITS))}, got {self.abits}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise LrqError(f"group size must be an even number >= 2 (or omitted for per-channel), got {self.group_size}")
        if self.act_asym and self.abits == 16:
            raise LrqError("asymmetric activations (--act-asym) need quantized activations: set --abits below 16")
        if self.wbits == 16 and self.abits == 16:
            raise LrqError("wbits=16 and abits=16 quantizes nothing; lower at least one of them")

    @property
    def quantize_weights(self) -> bool:
        return self.wbits < 16

    @property
    def quantize_activations(self) -> bool:
        return self.abits < 16

    @property
    def scenario(self) -> str:
        return (f"W{self.wbits}A{self.abits}" + (f"-g{self.group_size}" if self.group_size else "")
                + ("-asym" if self.act_asym else ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class CalibConfig:
    """How a quantized model is obtained: method and calibration-data settings."""

    method: str = "rtn"
    nsamples: int = 32
    seqlen: int | None = None  # tokens per sample (language models); None: the adapter's default
    seed: int = 0
    alpha: float = 0.5  # SmoothQuant migration strength
    epochs: int = 10
    lr_smooth: float = 5e-3
    lr_lwc: float = 1e-2
    batch_size: int = 1
    compile: bool = False  # torch.compile the learnable methods' training step (results within float tolerance)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LrqError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.nsamples < 1:
            raise LrqError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise LrqError(f"--seq-len must be >= 2, got {self.seqlen}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LrqError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.epochs < 0:
            raise LrqError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise LrqError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CalibConfig":
        return cls(**_known_fields(cls, data))


def _known_fields(cls, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
