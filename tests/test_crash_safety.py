"""Crash safety, determinism and safe loading, through real `lrq` processes.

A calibration killed with SIGKILL at any point (inside a block, between blocks, while the
checkpoint is written) resumes to the uninterrupted run's checkpoint; a killed export or
engine build leaves nothing at the target path; SIGINT ends with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostile import PicklePayload, read_only_directory

from lrq_deploy.cli import main
from lrq_deploy.provenance import sha256_of

LEARNABLE = ["--method", "lrquant", "--wbits", "4", "--abits", "8", "--group-size", "32",
             "--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]


def lrq(*args) -> list[str]:
    return [sys.executable, "-m", "lrq_deploy.cli", *map(str, args)]


def run_ok(*args) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def same_checkpoint(a: Path, b: Path) -> bool:
    """Byte-identical files; the manifest may differ only in its creation time (and so in the
    digest of its fields)."""
    def manifest(path):
        data = json.loads((path / "manifest.json").read_text())
        data.pop("created"), data.pop("manifest_sha256")
        return data

    files = sorted(p.name for p in a.iterdir())
    return (files == sorted(p.name for p in b.iterdir()) and manifest(a) == manifest(b)
            and all(sha256_of(a / f) == sha256_of(b / f) for f in files if f != "manifest.json"))


def kill_when(command: list[str], ready, timeout: float = 300.0, sig=signal.SIGKILL) -> bool:
    """Start `command` in its own process group, poll ready() every millisecond and send `sig` to
    the group as soon as it holds. False when the process ended before that."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, sig)
                proc.wait()
                return True
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _temporaries(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.tmp-*"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "q"
    run_ok("calibrate", tiny_llama_dir, "-o", out, *LEARNABLE, "--epochs", "6")
    return out


KILL_POINTS = {
    "inside-block-0": lambda out: (out.parent / "q.run" / "run.json").is_file()
    and not (out.parent / "q.run" / "block_000.safetensors").exists(),
    "after-block-0": lambda out: (out.parent / "q.run" / "block_000.safetensors").is_file(),
    "writing-checkpoint": lambda out: bool(_temporaries(out)),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_gives_the_uninterrupted_checkpoint(point, tiny_llama_dir, uninterrupted, tmp_path):
    out = tmp_path / "q"
    command = lrq("calibrate", tiny_llama_dir, "-o", out, *LEARNABLE, "--epochs", "6")
    for _ in range(5):  # the checkpoint is written in tens of milliseconds: poll again if a run slips past
        if kill_when(command, lambda: KILL_POINTS[point](out)):
            break
        for path in (out, tmp_path / "q.run"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    else:
        pytest.fail(f"never caught the run at {point}")
    assert not out.exists(), "a killed run left a checkpoint"
    run_ok("calibrate", tiny_llama_dir, "-o", out, "--resume")  # the settings come from the run directory
    assert same_checkpoint(out, uninterrupted)
    assert not _temporaries(out), "the killed run's temporary directory was not cleaned up"


def test_sigint_ends_with_one_line_and_no_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    # enough epochs that block 1 is still training when the test, on a loaded machine, gets to send the signal
    command = lrq("calibrate", tiny_llama_dir, "-o", out, *LEARNABLE, "--epochs", "40")
    # SIGINT as a terminal delivers it: a suite started in the background (nohup ... &) ignores SIGINT, and
    # children inherit that, so the child's disposition is reset to the default first
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (tmp_path / "q.run" / "block_000.safetensors").is_file():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert [line for line in stderr.splitlines() if line.startswith(("interrupted", "error", "Traceback"))] == ["interrupted"]
    assert not out.exists()


def test_killed_export_leaves_no_file(tmp_path, uninterrupted):
    target = tmp_path / "m.onnx"
    assert kill_when(lrq("export", uninterrupted, "--onnx", target), lambda: bool(_temporaries(target)))
    assert not target.exists()
    run_ok("export", uninterrupted, "--onnx", target, "--no-verify")
    assert target.is_file() and not _temporaries(target)


def test_killed_engine_build_leaves_no_file(tmp_path, uninterrupted):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX (extra [rtx])")
    graph, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    run_ok("calibrate", "-o", tmp_path / "sym", "--wbits", "4", "--group-size", "64", "--symmetric", "--nsamples", "2",
           "--seq-len", "16")
    run_ok("export", tmp_path / "sym", "--onnx", graph, "--target", "trt", "--no-verify")
    started = time.monotonic()
    assert kill_when(lrq("build-engine", graph, "-o", engine, "--sm", "89"),
                     lambda: time.monotonic() - started > 4 or bool(_temporaries(engine)))
    assert not engine.exists() and not (tmp_path / "m.engine.json").exists()


def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch):
    """A read-only output location is reported before the model is even loaded."""
    import lrq_deploy.calib.api as api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the output check"))
    where = read_only_directory(tmp_path / "ro")
    result = CliRunner().invoke(main, ["calibrate", "-o", f"{where}/q", "--method", "lrquant+", "--wbits", "4", "--abits", "4"])
    assert result.exit_code == 1 and "cannot write to" in result.output


@pytest.mark.parametrize("method", ["omniquant", "lrquant", "lrquant+"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_same_seed_gives_identical_checkpoints(method, batch_size, tiny_llama_dir, tmp_path):
    args = ["--method", method, "--wbits", "4", "--abits", "4", "--nsamples", "4", "--seq-len", "32", "--epochs", "2",
            "--batch-size", str(batch_size), "--seed", "3"]
    run_ok("calibrate", tiny_llama_dir, "-o", tmp_path / "a", *args)
    run_ok("calibrate", tiny_llama_dir, "-o", tmp_path / "b", *args, "--offload")
    assert same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_pickle_payload_is_refused_not_executed(tiny_llama_dir, tmp_path):
    """Pickled weights where safetensors are expected: refused with one line, never unpickled."""
    import pickle
    import shutil

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "m"))
    (model / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(PicklePayload(marker)))
    for command in (["calibrate", model, "-o", tmp_path / "o"], ["export", model, "--onnx", tmp_path / "x.onnx"]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 1 and "does not unpickle" in result.output
    assert not marker.exists()
    source = Path(__file__).resolve().parents[1] / "lrq_deploy"
    loads = [f"{p.relative_to(source)}" for p in source.rglob("*.py")
             if "torch.load(" in p.read_text() and "weights_only=True" not in p.read_text()]
    assert not loads, f"torch.load without weights_only=True in {loads}"
