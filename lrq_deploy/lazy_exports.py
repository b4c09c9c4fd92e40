"""Package attributes loaded on first use (PEP 562), so that importing a package does not
import torch until one of its torch modules is asked for."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module-level __getattr__ for `package`: exports maps an attribute to its submodule."""
    namespace = import_module(package).__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    return __getattr__
