"""Per-layer schemes: one scheme for the model and rules that give other schemes to the modules
their patterns match (`lrq calibrate --scheme-for 'lm_head=w4a16-g128'`, or a recipe file).

A rule's pattern is a shell-style glob over the full module name (`model.layers.0.mlp.down_proj`);
a pattern also matches as the last components of a name, so `down_proj` is every down_proj and
`mlp.*` every linear of every MLP. The first rule that matches a module gives its scheme; a module
no rule matches takes the default. The scheme `none` keeps a module in floating point.

A rule's scheme is written as a name or as fields:
- a name: a float preset (`fp8`, `nvfp4`, ...), `none`, or `w<bits>a<bits>` followed by any of
  `-g<size>` (weight groups), `-sym` (symmetric weights), `-act-sym` (symmetric activations);
- fields (in a recipe file): the scheme's fields, each one not given taken from the default.

A recipe file (YAML):

    default: w3a16            # optional: the command line's scheme otherwise
    layers:
      lm_head: w4a16-g128     # the head too (it is quantized once a rule names it)
      down_proj: {wbits: 4}   # the default with 4-bit weights
      model.layers.0.*: none  # the first block in floating point

Torch-free, like quant/scheme.py: the CLI validates rules before any model is loaded.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import PRESETS, QuantScheme, group_length

__all__ = ["KEEP_FLOAT", "BitBudget", "LayerSchemes", "SchemeRule", "effective_bits", "load_recipe", "parse_rule",
           "parse_scheme"]

KEEP_FLOAT = "none"
_NAMED = re.compile(r"w(\d+)a(\d+)((?:-g\d+|-sym|-act-sym)*)")


def parse_scheme(spec, default: QuantScheme) -> QuantScheme | None:
    """A rule's scheme from its name (str) or its fields (dict over `default`); None keeps float."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {f.name for f in fields(QuantScheme)})
        if unknown:
            raise LrqError(f"unknown scheme fields {', '.join(unknown)} in {spec} "
                           f"(fields: {', '.join(f.name for f in fields(QuantScheme))})")
        act_asym = spec.get("act_asym", None if "abits" in spec or "aformat" in spec else default.act_asym)
        return replace(default, **{**spec, "act_asym": act_asym})
    name = str(spec).strip().lower()
    if name == KEEP_FLOAT:
        return None
    if name in PRESETS:
        return QuantScheme.preset(name)
    match = _NAMED.fullmatch(name)
    if not match:
        raise LrqError(f"unknown scheme {spec!r}: write w<bits>a<bits> with -g<size>, -sym, -act-sym "
                       f"(w4a16-g128, w4a8-sym), a preset ({', '.join(PRESETS)}) or {KEEP_FLOAT}")
    suffixes = match.group(3)
    group = re.search(r"-g(\d+)", suffixes)
    return QuantScheme(wbits=int(match.group(1)), abits=int(match.group(2)),
                       group_size=int(group.group(1)) if group else None, symmetric="-sym" in suffixes.replace("-act-sym", ""),
                       act_asym=False if "-act-sym" in suffixes else None)


def scheme_label(scheme: QuantScheme | None) -> str:
    return KEEP_FLOAT if scheme is None else scheme.name


@dataclass(frozen=True)
class SchemeRule:
    pattern: str
    scheme: QuantScheme | None  # None: the module stays in floating point

    def matches(self, name: str) -> bool:
        """A linear behind an online rotation (`down_proj.linear`) answers to its own name too."""
        names = {name, name.removesuffix(".linear")}
        return any(fnmatch.fnmatchcase(n, self.pattern) or fnmatch.fnmatchcase(n, "*." + self.pattern) for n in names)

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "scheme": None if self.scheme is None else self.scheme.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "SchemeRule":
        scheme = data.get("scheme")
        return cls(str(data["pattern"]), None if scheme is None else QuantScheme.from_dict(scheme))


def parse_rule(text: str, default: QuantScheme) -> SchemeRule:
    """`PATTERN=SCHEME` as --scheme-for takes it."""
    pattern, sep, spec = text.partition("=")
    if not sep or not pattern.strip() or not spec.strip():
        raise LrqError(f"--scheme-for {text!r}: write PATTERN=SCHEME, e.g. 'lm_head=w4a16-g128' or 'down_proj=w4a16'")
    try:
        return SchemeRule(pattern.strip(), parse_scheme(spec, default))
    except LrqError as exc:
        raise LrqError(f"--scheme-for {text!r}: {exc}") from None


SCALE_BITS = {"int": 16, "fp8": 32, "nvfp4": 8, "mxfp4": 8}  # bits of one stored group scale, by weight format


def effective_bits(scheme: QuantScheme | None, in_features: int) -> float:
    """Bits per weight as deployed: the code, plus each group's scale and (asymmetric integers) a zero point
    at the code's width, as the packed formats store it; 16 for a linear kept in floating point."""
    if scheme is None or not scheme.quantize_weights:
        return 16.0
    size = group_length(scheme.group_size, in_features)
    zero = 0 if scheme.symmetric or scheme.float_format else scheme.wbits
    return scheme.wbits + (SCALE_BITS[scheme.wformat] + zero) / size


@dataclass(frozen=True)
class BitBudget:
    """--effective-bits: a scheme per linear chosen among `candidates` (calib/auto_scheme.py) so that the
    searched linears average at most `bits` bits per weight."""

    bits: float
    candidates: tuple[QuantScheme, ...]

    def to_dict(self) -> dict:
        return {"effective_bits": self.bits, "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, data: dict) -> "BitBudget":
        return cls(float(data["effective_bits"]), tuple(QuantScheme.from_dict(c) for c in data["candidates"]))


@dataclass(frozen=True)
class LayerSchemes:
    """The model's scheme and the rules that override it, first match first; with a budget, the
    search adds one rule per searched linear after these."""

    default: QuantScheme
    rules: tuple[SchemeRule, ...] = ()
    budget: BitBudget | None = None

    def rule_for(self, name: str) -> SchemeRule | None:
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def for_module(self, name: str) -> QuantScheme | None:
        """The scheme of the module `name` (None: kept in floating point)."""
        rule = self.rule_for(name)
        return self.default if rule is None else rule.scheme

    def names(self, name: str) -> bool:
        """Whether a rule names this module (a head is quantized once a rule names it)."""
        rule = self.rule_for(name)
        return rule is not None and rule.scheme is not None

    def check_matches(self, module_names: list[str]) -> None:
        """One line for a rule that matches none of the quantizable modules (a typo, or a module this
        family does not have), before any work."""
        for rule in self.rules:
            if not any(rule.matches(name) for name in module_names):
                examples = ", ".join(module_names[:4])
                raise LrqError(f"scheme rule {rule.pattern!r} matches no quantizable module (names look like "
                               f"{examples}, ...); a pattern is a glob over full names or their last components")

    def to_dict(self) -> dict:
        record = {"rules": [rule.to_dict() for rule in self.rules]}
        if self.budget is not None:
            record["budget"] = self.budget.to_dict()
        return record

    @classmethod
    def from_dict(cls, default: QuantScheme, data: dict | None) -> "LayerSchemes":
        data = data or {}
        budget = BitBudget.from_dict(data["budget"]) if data.get("budget") else None
        return cls(default, tuple(SchemeRule.from_dict(r) for r in data.get("rules", [])), budget)

    @property
    def uniform(self) -> bool:
        return not self.rules and self.budget is None


def load_recipe(path: Path, default: QuantScheme) -> LayerSchemes:
    """A recipe file (module docstring): its default (or `default`) and its rules, in file order."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LrqError(f"--recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LrqError(f"--recipe {path}: not a readable YAML recipe ({first})") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers", {}), dict) or set(data) - {"default", "layers"}:
        raise LrqError(f"--recipe {path}: expected a mapping with 'layers' (pattern: scheme) and optionally 'default'")
    if "default" in data:
        default = _recipe_scheme(path, "default", data["default"], default)
        if default is None:
            raise LrqError(f"--recipe {path}: the default scheme cannot be {KEEP_FLOAT}")
    return LayerSchemes(default, tuple(SchemeRule(str(p), _recipe_scheme(path, p, s, default))
                                       for p, s in data.get("layers", {}).items()))


def _recipe_scheme(path: Path, key, spec, default: QuantScheme) -> QuantScheme | None:
    try:
        return parse_scheme(spec, default)
    except LrqError as exc:
        raise LrqError(f"--recipe {path}: {key}: {exc}") from None
