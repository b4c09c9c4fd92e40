"""The two TensorRT flavours behind one small interface, each imported lazily.

- `tensorrt`: data-center and Jetson GPUs (Hopper included); extra `[trt]`.
- `tensorrt_rtx`: TensorRT for RTX (strongly typed only; SM75/80/86/89/120/121, no SM90);
  extra `[rtx]`. It builds engines on a machine without a GPU when target compute
  capabilities are named.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lrq_deploy.errors import LrqError

INSTALL_HINT = (
    "TensorRT is not installed: pip install 'lrq-deploy[trt]' (TensorRT) or 'lrq-deploy[rtx]' (TensorRT for RTX)"
)
MODULES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx_bindings"}


@dataclass
class Flavour:
    name: str
    trt: object  # the imported module

    @property
    def strongly_typed_only(self) -> bool:
        return self.name == "tensorrt_rtx"

    def network_flags(self) -> int:
        if self.strongly_typed_only:
            return 0  # RTX networks are always strongly typed
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def compute_capabilities(self, names: list[str]) -> list:
        if not names:
            return []
        if not hasattr(self.trt, "ComputeCapability"):
            raise LrqError(f"{self.name} builds for the GPU it runs on; --sm applies to tensorrt_rtx")
        caps = []
        for name in names:
            key = f"SM{name.upper().removeprefix('SM')}"
            if not hasattr(self.trt.ComputeCapability, key):
                known = [c for c in dir(self.trt.ComputeCapability) if c.startswith("SM")]
                raise LrqError(f"{self.name} cannot target {name} (it targets {', '.join(known)})")
            caps.append(getattr(self.trt.ComputeCapability, key))
        return caps


def load_flavour(preferred: str | None = None) -> Flavour:
    """Import the requested flavour, or the first one installed."""
    names = [preferred] if preferred else list(MODULES)
    for name in names:
        if name not in MODULES:
            raise LrqError(f"unknown TensorRT flavour {name!r} (known: {', '.join(MODULES)})")
        try:
            return Flavour(name, importlib.import_module(MODULES[name]))
        except ImportError:
            continue
    raise LrqError(INSTALL_HINT if not preferred else f"{preferred} is not installed: " + INSTALL_HINT.split(": ", 1)[1])
