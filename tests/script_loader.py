"""Load a benchmark or helper module by its file path, without putting its folder on sys.path
(a folder on sys.path makes every file in it importable by name, shadowing installed packages)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_module(relative_path: str):
    """The module at ROOT/relative_path, registered under a name no installed package can have."""
    path = ROOT / relative_path
    name = "lrq_tests_" + "_".join(Path(relative_path).with_suffix("").parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module
