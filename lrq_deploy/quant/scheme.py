"""QuantScheme: the one description of a quantized layer's numerics, for every stage.

The CLI builds it from options, the manifest stores it (`to_dict` / `from_dict`), the ONNX
nodes and the TensorRT plugins carry it as integer attributes (`to_attributes` /
`from_attributes`), and the kernel backend, lowering and plugins ask it which kernel family
serves a layer (`kernel`) and how long a weight group is (`group_length`). Nothing else
spells these fields or rules; a new format is a new value here, not a parallel code path.

Group size has one meaning everywhere: `None` is one group per output channel; kernels receive
the group's length, which always divides K. Node attributes spell per channel as 0 (attributes
cannot be None), converted here only.

Torch-free: the CLI and `lrq_deploy` import it without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.pack import container_bits

__all__ = [
    "ACT_BITS", "ATTRIBUTES", "DOMAIN", "FLOAT_FORMATS", "FORMATS", "KernelFamily", "PRESETS", "LAYER_ATTRIBUTES", "QuantScheme", "WEIGHT_BITS",
    "group_from_attr", "group_length", "kernel_schemes", "layer_attributes",
]

DOMAIN = "lrq"  # ONNX domain of every lrq node, and the TensorRT plugin namespace of their plugins

WEIGHT_BITS = (2, 3, 4, 6, 8, 16)
ACT_BITS = (4, 6, 8, 16)

# The scheme's fields as integer node / plugin attributes, in wire order; those with a default
# may be absent (graphs written before the field existed).
ATTRIBUTES = ("wbits", "abits", "group_size", "symmetric", "act_asym", "wformat", "aformat")
ATTRIBUTE_DEFAULTS = {"act_asym": 0, "wformat": 0, "aformat": 0}

# Number grids. "int": uniform integer codes with scale and zero point (quant/primitives.py); the
# float grids (quant/floats.py) with their bits and the block each scale covers (None: per output
# channel for weights / one static scale per layer input for activations).
FORMATS = ("int", "fp8", "nvfp4", "mxfp4")
FLOAT_FORMATS = {"fp8": (8, None), "nvfp4": (4, 16), "mxfp4": (4, 32)}

# Named schemes of the float formats, as users of other tools know them.
PRESETS = {
    "fp8": {"wformat": "fp8", "aformat": "fp8", "wbits": 8, "abits": 8, "group_size": None},
    "nvfp4": {"wformat": "nvfp4", "aformat": "nvfp4", "wbits": 4, "abits": 4, "group_size": 16},
    "mxfp4": {"wformat": "mxfp4", "aformat": "mxfp4", "wbits": 4, "abits": 4, "group_size": 32},
    "w8a16-fp8": {"wformat": "fp8", "aformat": "int", "wbits": 8, "abits": 16, "group_size": None},
    "w4a16-nvfp4": {"wformat": "nvfp4", "aformat": "int", "wbits": 4, "abits": 16, "group_size": 16},
    "w4a16-mxfp4": {"wformat": "mxfp4", "aformat": "int", "wbits": 4, "abits": 16, "group_size": 32},
}
# What a plugin node adds to the scheme: the layer's shape.
LAYER_ATTRIBUTES = ("in_features", "out_features")


class KernelFamily(str, Enum):
    WEIGHT_ONLY = "weight_only"  # float activations x 2/3/4-bit weights (in 2- or 4-bit containers)
    INTEGER = "integer"  # per-token integer activations x 3/4/6/8-bit weights, exact int32 sums
    FLOAT = "float"  # FP8 W8A8 on FP8 tensor cores, NVFP4 / MXFP4 W4A4 on block-scaled FP4 tensor cores


KV_FORMATS = ("none", "int8", "int4", "fp8")  # QuantScheme.kv_cache (quant/kv_cache.py)
KV_LABELS = {"int8": "kv8", "int4": "kv4", "fp8": "kvfp8"}


def check_kv_format(fmt: str) -> None:
    if fmt not in KV_FORMATS:
        raise LrqError(f"--kv-cache must be one of {', '.join(KV_FORMATS)}, got {fmt!r}")


WEIGHT_ONLY_BITS = (2, 3, 4)
INTEGER_WEIGHT_BITS = (3, 4, 6, 8)
INTEGER_ACT_BITS = (4, 6, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Numerics of a quantized model (validated on construction).

    wbits: weight bits (16 = keep weights in floating point).
    abits: activation bits (16 = keep activations in floating point). Activations are quantized
        per token, dynamically (round half to even): with act_asym (the default when abits < 16) over
        each token's [min, max] with a per-token zero point, as LRQuant / OmniQuant quantize them,
        or symmetrically (range +-(2^(b-1)-1)) for kernels that prefer it (quant/primitives.py).
    group_size: weights quantized in groups of this many input channels; None = per output channel.
    symmetric: symmetric weight quantization (zero point fixed at 2^(b-1)); default asymmetric.
    wformat / aformat: the number grid of weights / activations (FORMATS). A float grid fixes the
        bits and the block (FLOAT_FORMATS: FP8 per output channel, NVFP4 blocks of 16, MXFP4 of 32)
        and is symmetric by construction. Float activations share the weights' format: FP8 and NVFP4
        with one static scale per layer input (calibrated, as TensorRT needs it), NVFP4 / MXFP4 with
        dynamic block scales on top.
    kv_rotate: keys multiplied by a Hadamard matrix of the head size before they are quantized (the
        rotation methods' R3; queries meet them rotated alike, so attention is unchanged in exact arithmetic).
    kv_cache: the format attention's key/value cache is stored in (quant/kv_cache.py: none, int8,
        int4, fp8); a property of the model, read from its default scheme.
    """

    wbits: int = 4
    abits: int = 16
    group_size: int | None = None
    symmetric: bool = False
    act_asym: bool | None = None  # None: asymmetric whenever integer activations are quantized
    wformat: str = "int"
    aformat: str = "int"
    kv_cache: str = "none"
    kv_rotate: bool = False

    def __post_init__(self):
        self._check_formats()
        check_kv_format(self.kv_cache)
        if self.kv_rotate and self.kv_cache == "none":
            raise LrqError("--kv-rotate rotates the keys of a quantized KV cache: add --kv-cache int8 | int4 | fp8")
        if self.act_asym is None:
            object.__setattr__(self, "act_asym", self.abits < 16 and self.aformat == "int")
        if self.wbits not in WEIGHT_BITS:
            raise LrqError(f"wbits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.wbits}")
        if self.abits not in ACT_BITS:
            raise LrqError(f"abits must be one of {', '.join(map(str, ACT_BITS))}, got {self.abits}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise LrqError(f"group size must be an even number >= 2 (or omitted for per-channel), got {self.group_size}")
        if self.act_asym and self.abits == 16:
            raise LrqError("asymmetric activations (--act-asym) need quantized activations: set --abits below 16")
        object.__setattr__(self, "act_asym", bool(self.act_asym))
        if self.wbits == 16 and self.abits == 16:
            raise LrqError("wbits=16 and abits=16 quantizes nothing; lower at least one of them")

    def _check_formats(self) -> None:
        for role, fmt in (("weight", self.wformat), ("activation", self.aformat)):
            if fmt not in FORMATS:
                raise LrqError(f"{role} format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if self.wformat in FLOAT_FORMATS:
            bits, block = FLOAT_FORMATS[self.wformat]
            if (self.wbits, self.group_size) != (bits, block):
                raise LrqError(f"{self.wformat} weights are {bits}-bit with "
                               + (f"blocks of {block}" if block else "one scale per output channel")
                               + f": use --wbits {bits}" + (f" --group-size {block}" if block else " without --group-size")
                               + f" (or --scheme {self.wformat})")
            if self.symmetric:
                raise LrqError(f"{self.wformat} weights are symmetric by construction: drop --symmetric")
        if self.aformat in FLOAT_FORMATS:
            if self.aformat != self.wformat:
                raise LrqError(f"{self.aformat} activations need {self.aformat} weights (--wformat {self.aformat})")
            if self.abits != FLOAT_FORMATS[self.aformat][0]:
                raise LrqError(f"{self.aformat} activations are {FLOAT_FORMATS[self.aformat][0]}-bit: use --abits "
                               f"{FLOAT_FORMATS[self.aformat][0]}")
            if self.act_asym:
                raise LrqError(f"{self.aformat} activations are symmetric: drop --act-asym")
        elif self.wformat in FLOAT_FORMATS and self.abits < 16:
            raise LrqError(f"{self.wformat} weights take {self.wformat} or 16-bit activations, not {self.abits}-bit "
                           f"integers (--aformat {self.wformat} or --abits 16)")

    # -- the wire: manifest / CLI config and node / plugin attributes --------------------------

    def to_dict(self) -> dict:
        """The fields; the number formats only when not integer, so integer schemes are recorded (manifests,
        run directories) exactly as before the formats existed and earlier runs resume."""
        return {k: v for k, v in asdict(self).items()
                if not (k in ("wformat", "aformat") and v == "int") and not (k == "kv_cache" and v == "none")
                and not (k == "kv_rotate" and not v)}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantScheme":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LrqError(f"unknown quantization fields {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**{"act_asym": False, **data})  # records made before the field existed were symmetric

    @classmethod
    def preset(cls, name: str, **overrides) -> "QuantScheme":
        """A named float scheme (PRESETS), optionally with other fields set."""
        if name not in PRESETS:
            raise LrqError(f"unknown scheme {name!r} (schemes: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    def to_attributes(self) -> dict[str, int]:
        """The scheme as integer attributes of an lrq ONNX node or TensorRT plugin (group 0 = per channel,
        formats by their index in FORMATS)."""
        return {"wbits": self.wbits, "abits": self.abits, "group_size": self.group_size or 0,
                "symmetric": int(self.symmetric), "act_asym": int(self.act_asym),
                "wformat": FORMATS.index(self.wformat), "aformat": FORMATS.index(self.aformat)}

    @classmethod
    def from_attributes(cls, attrs: dict, owner: str = "lrq node") -> "QuantScheme":
        """From integer attributes (other keys ignored); one clear error names any missing."""
        missing = [name for name in ATTRIBUTES if name not in attrs and name not in ATTRIBUTE_DEFAULTS]
        if missing:
            raise LrqError(f"{owner} lacks attributes {', '.join(missing)}")
        value = {name: int(attrs.get(name, ATTRIBUTE_DEFAULTS.get(name))) for name in ATTRIBUTES}
        if not all(0 <= value[f] < len(FORMATS) for f in ("wformat", "aformat")):
            raise LrqError(f"{owner} has an unknown number format ({value['wformat']}, {value['aformat']})")
        return cls(value["wbits"], value["abits"], group_from_attr(value["group_size"]), bool(value["symmetric"]),
                   bool(value["act_asym"]), FORMATS[value["wformat"]], FORMATS[value["aformat"]])

    # -- what stages ask -----------------------------------------------------------------------

    @property
    def quantize_weights(self) -> bool:
        return self.wbits < 16

    @property
    def quantize_activations(self) -> bool:
        return self.abits < 16

    @property
    def float_format(self) -> str | None:
        """The float grid of this scheme (weights', which activations share), or None for integers."""
        return self.wformat if self.wformat in FLOAT_FORMATS else None

    @property
    def name(self) -> str:
        """The scheme's one-line name: W4A16-g64, W4A4-asym, W4A4-nvfp4, W8A8-fp8, ..."""
        cache = f"-{KV_LABELS[self.kv_cache]}" + ("h" if self.kv_rotate else "") if self.kv_cache != "none" else ""
        if self.float_format:
            return f"W{self.wbits}A{self.abits}-{self.float_format}{cache}"
        return (f"W{self.wbits}A{self.abits}" + (f"-g{self.group_size}" if self.group_size else "")
                + ("-asym" if self.act_asym else "") + cache)

    @property
    def container_bits(self) -> int:
        return container_bits(self.wbits)

    @property
    def kernel(self) -> KernelFamily | None:
        """The kernel family serving this scheme, or None (reference arithmetic only)."""
        if self.float_format:
            return KernelFamily.FLOAT if self.quantize_activations else None
        if self.abits == 16 and self.wbits in WEIGHT_ONLY_BITS:
            return KernelFamily.WEIGHT_ONLY
        if self.abits in INTEGER_ACT_BITS and self.wbits in INTEGER_WEIGHT_BITS:
            return KernelFamily.INTEGER
        return None

    def require_kernel(self) -> KernelFamily:
        if self.kernel is None:
            raise LrqError(
                f"no kernel for {self.name} (kernels: weight-only W2/W3/W4 with 16-bit activations; "
                "W3/W4/W6/W8 weights with 4/6/8-bit activations; FP8 W8A8, NVFP4 / MXFP4 W4A4); use the reference backend"
            )
        return self.kernel

    @property
    def native_int4(self) -> bool:
        """TensorRT's own INT4 path serves it: symmetric 4-bit weights, float activations."""
        return self.wbits == 4 and self.abits == 16 and self.symmetric and not self.float_format

    @property
    def plugin_name(self) -> str:
        """The TensorRT plugin / lrq ONNX node type of this scheme."""
        return f"W{self.wbits}A{self.abits}Linear"

    def group_length(self, in_features: int) -> int:
        return group_length(self.group_size, in_features)

    def groups(self, in_features: int) -> int:
        return in_features // self.group_length(in_features)


def layer_attributes(attrs: dict, owner: str = "lrq plugin node") -> tuple[QuantScheme, int, int]:
    """(scheme, in_features, out_features) from a plugin node's attributes."""
    missing = [name for name in LAYER_ATTRIBUTES if name not in attrs]
    if missing:
        raise LrqError(f"{owner} lacks attributes {', '.join(missing)}")
    return QuantScheme.from_attributes(attrs, owner), int(attrs["in_features"]), int(attrs["out_features"])


def group_from_attr(value: int) -> int | None:
    """An attribute's group size (0 = per channel) as the scheme spells it."""
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
