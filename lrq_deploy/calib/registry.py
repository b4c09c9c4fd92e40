"""The method registry and the calibration settings.

A method is one module in calib/methods/ that defines `METHOD = Method(...)`: its name, a frozen
options dataclass (its own settings, with their defaults and help) and the function that
quantizes one block. Built-in methods are registered the first time the registry is asked, by
calling `register` on each module's METHOD (importing a module registers nothing); a method
defined elsewhere (a test, a user's package) calls `register` itself.

The CLI builds its method options from the registered options classes, the manifest records the
chosen method's options (`CalibConfig.to_dict`), and resume reads them back. Torch-free: the
method modules import their torch code inside `quantize_block`.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from lrq_deploy.errors import LrqError

__all__ = ["CalibConfig", "Method", "get_method", "method_names", "methods", "option", "register"]


def option(default, help: str, check: Callable[[Any], str | None] | None = None):  # noqa: A002 - click's word
    """A method option: a dataclass field with its command-line help and an optional check that
    returns an error message for a bad value."""
    return field(default=default, metadata={"help": help, "check": check})


def check_options(options) -> None:
    """Run every field's check (options dataclasses call it from __post_init__)."""
    for f in fields(options):
        check = f.metadata.get("check")
        problem = check(getattr(options, f.name)) if check else None
        if problem:
            raise LrqError(f"--{f.name.replace('_', '-')} {problem}, got {getattr(options, f.name)!r}")


def positive_finite(value) -> str | None:
    return None if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else "must be a finite number > 0"


@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


@dataclass(frozen=True)
class Method:
    name: str
    options: type  # frozen dataclass of the method's settings; every field has a default
    quantize_block: Callable  # (BlockJob) -> dict | None: quantize job.block in place (job.options: the settings)
    summary: str
    resumable: bool = False  # keeps learned per-block parameters in a run directory (resume after a stop)
    order: int = 100  # place in listings (--method choices, help); ties by name
    quantize_head: Callable | None = None  # (calib.head.HeadJob) -> QuantLinear; None: round to nearest

    def __post_init__(self):
        missing = [f.name for f in fields(self.options) if f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise LrqError(f"method {self.name!r}: options {', '.join(missing)} need defaults")


_REGISTRY: dict[str, Method] = {}
_BUILT_IN_LOADED = False


def register(method: Method) -> Method:
    """Add a method; registering the same object again is harmless, another with a taken name is refused."""
    known = _REGISTRY.get(method.name)
    if known is not None and known is not method:
        raise LrqError(f"a method named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def _load_built_in() -> None:
    global _BUILT_IN_LOADED
    if _BUILT_IN_LOADED:
        return
    _BUILT_IN_LOADED = True
    from lrq_deploy.calib import methods as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # shared helpers of several methods
            continue
        register(importlib.import_module(f"{package.__name__}.{info.name}").METHOD)


def methods() -> list[Method]:
    """Every registered method, by listing order, then name."""
    _load_built_in()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def method_names() -> list[str]:
    return [m.name for m in methods()]


def get_method(name: str) -> Method:
    _load_built_in()
    if name not in _REGISTRY:
        raise LrqError(f"method must be one of {', '.join(method_names())}, got {name!r}")
    return _REGISTRY[name]


def option_fields() -> dict[str, tuple[Any, str, list[str]]]:
    """Every method option by name: (default, help, the methods taking it). Methods that share an
    option name share its meaning and default."""
    found: dict[str, tuple[Any, str, list[str]]] = {}
    for method in methods():
        for f in fields(method.options):
            if f.name in found:
                default, help_text, owners = found[f.name]
                if default != f.default:
                    raise LrqError(f"option {f.name} has different defaults in {owners[0]} and {method.name}")
                owners.append(method.name)
            else:
                found[f.name] = (f.default, f.metadata.get("help", ""), [method.name])
    return found


ROTATIONS = ("none", "hadamard", "random-hadamard", "orthogonal")  # --rotate: rotate.py's rotation matrices, or none


@dataclass(frozen=True)
class CalibConfig:
    """How a quantized model is obtained: the method with its options, and the calibration data."""

    method: str = "rtn"
    nsamples: int = 32
    seqlen: int | None = None  # tokens per sample (language models); None: the adapter's default
    seed: int = 0
    batch_size: int = 1  # samples per forward chunk and per optimizer step
    options: Any = None  # the method's options dataclass; None: its defaults
    quantize_head: bool = False  # also the output head, by the method's head rounding (calib/head.py)
    rotate: str = "none"  # orthogonal rotations folded before the method runs (rotate.py): one of ROTATIONS

    def __post_init__(self):
        spec = get_method(self.method)
        if self.options is None:
            object.__setattr__(self, "options", spec.options())
        elif not isinstance(self.options, spec.options):
            raise LrqError(f"method {self.method} takes {spec.options.__name__}, got {type(self.options).__name__}")
        if self.nsamples < 1:
            raise LrqError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise LrqError(f"--seq-len must be >= 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise LrqError(f"batch size must be >= 1, got {self.batch_size}")
        if self.rotate not in ROTATIONS:
            raise LrqError(f"--rotate must be one of {', '.join(ROTATIONS)}, got {self.rotate!r}")

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    @property
    def held_out_samples(self) -> int:
        """Calibration windows drawn besides nsamples that the method validates on, never trains on."""
        return getattr(self.options, "held_out_samples", 0)

    @classmethod
    def of(cls, method: str = "rtn", **settings) -> "CalibConfig":
        """Common settings and the method's options given together, as the CLI gives them; an
        option the method does not take is refused by name."""
        spec = get_method(method)
        common = {f.name for f in fields(cls)} - {"method", "options"}
        own = {f.name for f in fields(spec.options)}
        stray = sorted(set(settings) - common - own)
        if stray:
            names = ", ".join(f"--{n.replace('_', '-')}" for n in stray)
            takes = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(own)) or "none"
            raise LrqError(f"{names} does not apply to method {method} (its options: {takes})")
        options = spec.options(**{k: v for k, v in settings.items() if k in own})
        return cls(method=method, options=options, **{k: v for k, v in settings.items() if k in common})

    def to_dict(self) -> dict:
        """The manifest's "calib"; quantize_head and rotate appear only when set (records made before
        they existed then read back equal, which resuming their runs relies on)."""
        record = {"method": self.method, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                  "batch_size": self.batch_size, "options": asdict(self.options)}
        if self.quantize_head:
            record["quantize_head"] = True
        if self.rotate != "none":
            record["rotate"] = self.rotate
        return record

    @classmethod
    def from_dict(cls, data: dict) -> "CalibConfig":
        """From to_dict's form (also the earlier flat form, where method options sat beside the
        common settings and every method recorded every option)."""
        spec = get_method(data.get("method", "rtn"))
        own = {f.name for f in fields(spec.options)}
        options = data.get("options")
        if options is None:
            options = {k: v for k, v in data.items() if k in own}
        unknown = sorted(set(options) - own)
        if unknown:
            raise LrqError(f"method {spec.name} has no options {', '.join(unknown)}")
        common = {f.name for f in fields(cls)} - {"method", "options"}
        return cls(method=spec.name, options=spec.options(**options), **{k: data[k] for k in common if k in data})
