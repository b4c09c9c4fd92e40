"""The import map: lrq_deploy's packages form layers; nothing imports a layer above it, so there
is no import cycle among them, and no two modules anywhere import each other, directly or
through others, not even inside one package (docs/ARCHITECTURE.md draws the same map)."""

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lrq_deploy": ROOT / "lrq_deploy", "lrq_deploy.plugins": ROOT / "plugins"}

# Lowest first. A module may import its own layer's modules and any layer below.
LAYERS = [
    {"errors"},
    {"atomic", "provenance", "data", "devices", "tensor_files", "graph_io", "artifacts", "lazy_exports", "progress"},
    {"quant"},
    {"plugins"},
    {"metrics"},
    {"models"},
    {"fold", "rotate", "checkpoint"},
    {"runtime"},
    {"serve"},  # hand-offs to serving engines (Triton repositories), used by export and engine
    {"calib"},  # the stages, in pipeline order
    {"eval"},
    {"export"},
    {"engine"},
    {"bench"},
    {"info"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str:
    """lrq_deploy.calib.api -> calib; lrq_deploy.errors -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    """Every lrq_deploy module -> the lrq_deploy modules it imports (top level or inside functions)."""
    graph = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *relative)).removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    module = node.module or ""
                    if node.level:
                        module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
                    if module.startswith("lrq_deploy"):
                        targets.add(module)
                        targets.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in _all_modules())
                elif isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names if a.name.startswith("lrq_deploy"))
            graph[name] = targets
    return graph


_MODULES: set[str] = set()


def _all_modules() -> set[str]:
    if not _MODULES:
        for package, folder in PACKAGES.items():
            for path in folder.rglob("*.py"):
                _MODULES.add(".".join((package, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__"))
    return _MODULES


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in imports()} - {"__init__"}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS"


def test_no_unit_imports_a_layer_above_it():
    upward = []
    for module, targets in imports().items():
        for target in targets:
            source, dest = unit_of(module), unit_of(target)
            if source == "__init__" or dest == "__init__" or source == dest:
                continue
            if RANK[dest] > RANK[source]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_among_packages():
    edges = {(unit_of(m), unit_of(t)) for m, ts in imports().items() for t in ts if unit_of(m) != unit_of(t)}
    units = {u for edge in edges for u in edge}
    reach = {u: {b for a, b in edges if a == u} for u in units}
    for _ in units:  # transitive closure
        for u, k in itertools.product(units, units):
            if k in reach[u]:
                reach[u] |= reach[k]
    cycles = sorted(u for u in units if u in reach[u])
    assert not cycles, f"import cycles through {cycles}"


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), imports inside functions included."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    """Also within one package (engine/build <-> engine/verify was one); a package's __init__
    re-exporting its modules is not a cycle of the modules themselves."""
    graph = {m: {t for t in ts if not _is_package_init_of(t, m)} for m, ts in imports().items()}
    graph = {m: ts for m, ts in graph.items() if not _is_package(m)}
    assert module_cycles(graph) == []


def _is_package(module: str) -> bool:
    return module in {".".join((pkg, *p.relative_to(folder).parent.parts)).rstrip(".")
                      for pkg, folder in PACKAGES.items() for p in folder.rglob("__init__.py")}


def _is_package_init_of(target: str, module: str) -> bool:
    return _is_package(target) and module.startswith(target + ".")


def test_the_cycle_finder_finds_cycles():
    assert module_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert module_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_package_root_stays_torch_free_and_small():
    """`lrq --help` must not import torch: the package root imports only errors and the scheme."""
    import subprocess
    import sys

    root = imports()["lrq_deploy"]
    assert {unit_of(t) for t in root} <= {"errors", "quant"}
    code = "import sys, lrq_deploy, lrq_deploy.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_every_package_and_data_file_is_shipped():
    """pyproject.toml lists packages explicitly: a new folder, or a data file the code reads,
    must be listed too, or a non-editable install lacks it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {".".join((pkg, *p.parent.relative_to(folder).parts)) for pkg, folder in PACKAGES.items()
               for p in folder.rglob("__init__.py")}
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages"
    data = config["package-data"]
    for pkg, folder in PACKAGES.items():
        shipped = {f for pattern in data.get(pkg, []) for f in folder.glob(pattern)}
        files = {f for f in folder.glob("*") if f.is_file() and f.suffix not in (".py", ".pyc")}
        assert files <= shipped, f"add {sorted(f.name for f in files - shipped)} to package-data of {pkg}"
