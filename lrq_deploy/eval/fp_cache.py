"""The full-precision figure of an evaluation, kept between runs: it depends only on the source
model's files, the evaluation data, the settings and the library versions, so evaluating a
second checkpoint of the same model (or the same one again) reads it back instead of running
the full-precision model again. Files are identified by path, size and modification time, as
build tools do: an edited model or data file is a new key."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lrq_deploy.errors import LrqError

CACHE_FORMAT = "lrq-fp-eval/1"


def cache_dir() -> Path:
    return Path(os.environ.get("LRQ_CACHE") or Path.home() / ".cache" / "lrq") / "fp-eval"


def fp_key(source: str, data: Path | None, settings: dict) -> str | None:
    """The cache key of a full-precision evaluation (None: the source is not files on this
    machine, so there is nothing to key it on)."""
    from lrq_deploy.provenance import library_versions

    files = _source_files(source)
    if not files:
        return None
    record = {"format": CACHE_FORMAT, "source": [_stat(f) for f in files], "data": _data_stats(data),
              "settings": settings, "versions": library_versions("tokenizers", "scikit-learn")}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def read_fp(key: str | None) -> dict | None:
    if key is None:
        return None
    try:
        entry = json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry.get("fp") if isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT else None


def write_fp(key: str | None, figures: dict) -> None:
    """Keep the figures; a cache that cannot be written is skipped (it only saves time)."""
    from lrq_deploy.atomic import write_json

    if key is None:
        return
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json(cache_dir() / f"{key}.json", {"format": CACHE_FORMAT, "fp": figures})
    except OSError:
        pass


def _source_files(source: str) -> list[Path]:
    from lrq_deploy.models.specs import PACKAGED_PREFIX, TIMM_PREFIX, model_path

    try:
        if source.startswith(TIMM_PREFIX):
            weights = Path(source.partition("@")[2])
            return [weights] if weights.is_file() else []
        if source.startswith(PACKAGED_PREFIX):
            return []  # resolved (and extracted) by the loader; not keyed
        path = model_path(source)
    except LrqError:
        return []
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def _data_stats(data: Path | None) -> list:
    if data is None:  # the bundled sets (the digits come from scikit-learn, keyed by its version)
        from lrq_deploy.data import DATA_DIR

        return ["bundled", *(_stat(f) for f in sorted(DATA_DIR.iterdir()))]
    data = Path(data)
    files = sorted(p for p in data.rglob("*") if p.is_file()) if data.is_dir() else [data]
    return [_stat(f) for f in files]


def _stat(path: Path) -> list:
    info = path.stat()
    return [str(path.resolve()), info.st_size, info.st_mtime_ns]
