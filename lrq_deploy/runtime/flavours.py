"""The two TensorRT flavours behind one small interface, each imported lazily.

- `tensorrt`: data-center and Jetson GPUs (Hopper included); extra `[trt]`.
- `tensorrt_rtx`: TensorRT for RTX (strongly typed only; SM75/80/86/89/120/121, no SM90);
  extra `[rtx]`. It builds engines on a machine without a GPU when target compute
  capabilities are named.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

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
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "unknown"))

    @property
    def strongly_typed_only(self) -> bool:
        return self.name == "tensorrt_rtx"

    def network_flags(self) -> int:
        if self.strongly_typed_only:
            return 0  # RTX networks are always strongly typed
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def build_process_env(self, scratch: Path) -> dict:
        """Environment of the child process that builds an engine.

        TensorRT for RTX's ONNX parser dlopens the unversioned `libtensorrt_rtx.so` when it adds
        a plugin layer, and the wheels ship only `libtensorrt_rtx.so.1`; a link in `scratch`,
        put on LD_LIBRARY_PATH (read once, when a process starts), lets it find the library.
        """
        env = dict(os.environ)
        if self.name != "tensorrt_rtx":
            return env
        loaded = _loaded_library("libtensorrt_rtx.so.")
        if loaded is not None:
            (scratch / "libtensorrt_rtx.so").symlink_to(loaded)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(scratch), env.get("LD_LIBRARY_PATH")]))
        return env

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


def _loaded_library(prefix: str) -> Path | None:
    """Path of a shared library this process has loaded (Linux), or None."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if f"/{prefix}" in line}
    return Path(sorted(paths)[0]) if paths else None


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
