"""No file or folder in benchmarks/, scripts/ or tests/ may share its name with an importable
package: running a script puts its folder first on sys.path, and pytest puts every test folder
there, so a `benchmarks/kernels.py` answers `import kernels` for transformers instead of the
`kernels` distribution (and a `tests/profile.py` would shadow the standard library's)."""

import importlib.metadata
import sys
from pathlib import Path

from script_loader import ROOT

FOLDERS = ("benchmarks", "scripts", "tests")


def _top_level_names(folder: Path) -> dict[str, Path]:
    """Every name `import NAME` could find in folder or any folder below it (each may be on sys.path)."""
    names = {}
    for path in folder.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.suffix == ".py" and path.name != "__init__.py":
            names[path.stem] = path
        elif path.is_dir() and (path / "__init__.py").exists():
            names[path.name] = path
    return names


def _installed_names() -> dict[str, str]:
    """Importable top-level names of the environment -> who provides them: every installed
    distribution's top-level modules and its own (normalized) name, and the standard library."""
    names = {name: "the standard library" for name in sys.stdlib_module_names}
    for name, dists in importlib.metadata.packages_distributions().items():
        names[name] = f"distribution {dists[0]}"
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").lower().replace("-", "_").replace(".", "_")
        if dist_name:
            names.setdefault(dist_name, f"distribution {dist.metadata['Name']}")
    return names


def clashes(folders=FOLDERS, root: Path = ROOT) -> list[str]:
    installed = _installed_names()
    found = []
    for folder in folders:
        for name, path in sorted(_top_level_names(root / folder).items()):
            if name in installed and name != "conftest":  # pytest imports conftest files itself
                found.append(f"{path.relative_to(root)} shadows `import {name}` ({installed[name]})")
    return found


def test_no_script_or_test_module_shadows_an_installed_package():
    assert clashes() == []


def test_a_module_named_like_an_installed_package_is_caught(tmp_path):
    """The clash that broke transformers >= 5.25: a benchmarks/kernels.py shadowed the `kernels`
    distribution it imports (checked where that distribution is installed; torch always is)."""
    import importlib.util

    (tmp_path / "benchmarks" / "tools").mkdir(parents=True)
    for name in ("kernels.py", "profile.py", "tools/torch.py", "unique_lrq_name.py"):
        (tmp_path / "benchmarks" / name).write_text("")
    found = clashes(("benchmarks",), tmp_path)
    assert any("torch.py shadows `import torch` (distribution torch)" in line for line in found), found
    assert any("profile.py shadows `import profile` (the standard library)" in line for line in found), found
    assert not any("unique_lrq_name" in line for line in found)
    if importlib.util.find_spec("kernels") is not None:
        assert any("kernels.py shadows `import kernels`" in line for line in found), found
