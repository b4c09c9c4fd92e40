"""Hugging Face model ids resolve through huggingface_hub's cache: offline from a populated cache,
one clear line when the id is not cached; pickled weights are never fetched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import invoke
from lrq_deploy.errors import LrqError
from lrq_deploy.models.hub import HUB_FILES, is_hub_id, with_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo: str, model_dir: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """The cache layout huggingface_hub writes: models--ORG--NAME/{refs/REF, snapshots/COMMIT/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, tiny_llama_dir, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    populate_cache(cache, "tiny-org/tiny-llama", tiny_llama_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("meta-llama/Llama-3.2-1B") and is_hub_id("Qwen/Qwen3-0.6B@main")
    assert not is_hub_id("bundled:llama") and not is_hub_id("./org/name") and not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name"), "a local directory wins over a hub id of the same spelling"


def test_revision_is_part_of_the_spec():
    assert with_revision("org/name", "v1") == "org/name@v1"
    assert with_revision("org/name", None) == "org/name"
    with pytest.raises(LrqError, match="names a revision already"):
        with_revision("org/name@v0", "v1")
    with pytest.raises(LrqError, match="applies to Hugging Face model ids"):
        with_revision("bundled:llama", "v1")


def test_no_pickled_weights_are_fetched():
    import fnmatch

    for name in ("pytorch_model.bin", "model.ckpt", "tf_model.h5", "flax_model.msgpack", "optimizer.pt"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_FILES), name


def test_cached_model_id_calibrates_offline(hub_cache, tmp_path):
    out = tmp_path / "q"
    result = invoke("calibrate", "tiny-org/tiny-llama", "-o", out, "--nsamples", "2", "--seq-len", "16")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "tiny-org/tiny-llama"
    result = invoke("eval", out, "--limit", "1", "--seq-len", "16", "--no-fp-cache", "--json")
    assert result.exit_code == 0, result.output  # the full-precision baseline is read from the cache too
    assert json.loads(result.output)["fp"]["ppl"] > 1
    result = invoke("calibrate", "tiny-org/tiny-llama", "--revision", "main", "-o", tmp_path / "r",
                    "--nsamples", "2", "--seq-len", "16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["source"] == "tiny-org/tiny-llama@main"


def test_uncached_model_id_fails_offline_in_one_line(hub_cache, tmp_path):
    result = invoke("calibrate", "tiny-org/not-cached", "-o", tmp_path / "q")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0], result.output
    assert not (tmp_path / "q").exists()
    result = invoke("calibrate", "tiny-org/tiny-llama@v9", "-o", tmp_path / "q")
    assert result.exit_code != 0 and "not in the Hugging Face cache" in result.output


def test_model_id_from_a_fresh_process(hub_cache, tmp_path):
    """The environment variables alone (as a user sets them) select the cache and offline mode."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "lrq_deploy.cli", "-q", "calibrate", "tiny-org/tiny-llama", "-o", str(out),
                           "--nsamples", "2", "--seq-len", "16"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["family"] == "llama"
    proc = subprocess.run([sys.executable, "-m", "lrq_deploy.cli", "calibrate", "tiny-org/absent", "-o", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
