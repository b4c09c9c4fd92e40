"""Outputs never destroy a user's data: no command, with or without --force, changes a file that
existed before it and that is not an lrq output of the same kind; --force replaces only lrq
artifacts of the output's kind; concurrent writers to one output are refused, not raced."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lrq_deploy.atomic import lock_output, release_outputs
from cli_runner import invoke


def tree(root: Path) -> dict:
    """Every file and directory under root with its content hash (directories: None)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def lrq(*args) -> tuple[int, str]:
    result = invoke(*args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A checkpoint and its ONNX graph (made once), copied into each test's own directory."""
    root = tmp_path_factory.mktemp("outputs")
    assert lrq("calibrate", "-o", root / "ckpt", "--nsamples", "2", "--seq-len", "16", "--group-size", "64")[0] == 0
    assert lrq("export", root / "ckpt", "--onnx", root / "model.onnx", "--no-verify")[0] == 0
    return root


@pytest.fixture
def place(artifacts, tmp_path):
    """A user's directory: the checkpoint, the graph, a file and a directory of their own."""
    import shutil

    shutil.copytree(artifacts / "ckpt", tmp_path / "ckpt")
    shutil.copy(artifacts / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.bin").write_bytes(b"\x00\x01precious")
    return tmp_path


# What each command writes, given the place and the target path of its output.
COMMANDS = {
    "calibrate": lambda p, t: ["calibrate", p / "ckpt", "-o", t, "--nsamples", "2", "--seq-len", "16"],
    "calibrate-bundled": lambda p, t: ["calibrate", "-o", t, "--nsamples", "2", "--seq-len", "16"],
    "export-onnx": lambda p, t: ["export", p / "ckpt", "--onnx", t, "--no-verify"],
    "export-vllm": lambda p, t: ["export", p / "ckpt", "--vllm", t],
    "export-triton": lambda p, t: ["export", p / "ckpt", "--onnx", p / "new.onnx", "--no-verify", "--triton-repo", t],
    "build-engine": lambda p, t: ["build-engine", p / "model.onnx", "-o", t, "--fp16", "--sm", "89"],
    "bench-json": lambda p, t: ["bench", p / "model.onnx", "--export-json", t, "--iterations", "1", "--duration", "0"],
    "bench-times": lambda p, t: ["bench", p / "model.onnx", "--export-times", t, "--iterations", "1", "--duration", "0"],
}
# Paths a command must never write: a user's file, a user's directory, the inputs, and places inside them.
TARGETS = {
    "user-file": lambda p: p / "notes.txt",
    "user-directory": lambda p: p / "mine",
    "the-checkpoint": lambda p: p / "ckpt",
    "inside-the-checkpoint": lambda p: p / "ckpt" / "model.safetensors",
    "the-graph": lambda p: p / "model.onnx",
}


# Writes that are the command's job: an lrq artifact of the same kind replaced with --force, a
# model directory added to an existing Triton repository (test_force_replaces_... covers them).
LEGITIMATE = {("calibrate-bundled", "the-checkpoint", True), ("export-onnx", "the-graph", True),
              ("export-triton", "user-directory", False), ("export-triton", "user-directory", True)}


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_changes_what_it_did_not_write(command, target, force, place):
    if (command, target, force) in LEGITIMATE:
        pytest.skip("the command's own job")
    args = COMMANDS[command](place, TARGETS[target](place)) + (["--force"] if force else [])
    before = tree(place)
    code, output = lrq(*args)
    assert code != 0, output
    assert output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert tree(place) == before


def test_force_replaces_an_lrq_artifact_of_the_same_kind(place):
    out = place / "again"
    assert lrq("calibrate", "-o", out, "--nsamples", "2", "--seq-len", "16")[0] == 0
    first = tree(out)
    code, output = lrq("calibrate", "-o", out, "--nsamples", "2", "--seq-len", "16", "--group-size", "64", "--force")
    assert code == 0, output
    assert json.loads((out / "manifest.json").read_text())["quant"]["group_size"] == 64 and tree(out) != first
    graph = place / "again.onnx"
    assert lrq("export", out, "--onnx", graph, "--no-verify")[0] == 0
    code, output = lrq("export", out, "--onnx", graph, "--no-verify", "--force")
    assert code == 0, output
    code, output = lrq("export", out, "--onnx", place / "notes.txt", "--no-verify", "--force")
    assert code == 1 and "is not an lrq ONNX graph" in output


def test_another_kind_of_lrq_artifact_is_not_replaced(place):
    """A checkpoint is not a vLLM export, a Triton model directory or a graph: --force refuses it."""
    import shutil

    shutil.copytree(place / "ckpt", place / "other")
    before = tree(place)
    code, output = lrq("export", place / "ckpt", "--vllm", place / "other", "--force")
    assert code == 1 and "is not an lrq vLLM export" in output
    code, output = lrq("export", place / "ckpt", "--onnx", place / "t.onnx", "--no-verify", "--triton-repo", place,
                       "--force")
    assert code == 0 or "not an lrq" not in output  # REPO/t is new: written beside the user's files
    code, output = lrq("calibrate", "-o", place / "model.onnx", "--force")
    assert code == 1 and "exists and is not a directory" in output
    assert {k: v for k, v in tree(place).items() if k != "t" and not k.startswith(("t.onnx", "t/"))} == before


def test_bench_records_are_not_overwritten_without_force(place):
    record = place / "bench.json"
    args = ["bench", place / "model.onnx", "--export-json", record, "--iterations", "1", "--duration", "0",
            "--warm-up", "0", "--seq-len", "8"]
    assert lrq(*args)[0] == 0
    assert json.loads(record.read_text())["format"] == "lrq-bench/1"
    code, output = lrq(*args)
    assert code == 1 and "exists (use --force" in output
    assert lrq(*args, "--force")[0] == 0


def test_outputs_of_one_command_do_not_overlap(place):
    before = tree(place)
    code, output = lrq("export", place / "ckpt", "--onnx", place / "x", "--no-verify", "--triton-repo", place / "x")
    assert code == 1 and "overlap" in output and tree(place) == before


def test_a_second_writer_of_the_same_output_is_refused(place):
    """While one lrq process holds an output, another one is refused at once (the lock is the
    kernel's: a killed writer releases it)."""
    out = place / "busy"
    lock_output(out)
    try:
        proc = subprocess.run([sys.executable, "-m", "lrq_deploy.cli", "calibrate", "-o", str(out), "--nsamples", "2",
                               "--seq-len", "16"], capture_output=True, text=True)
    finally:
        release_outputs()
    assert proc.returncode == 1 and "another lrq process" in proc.stderr and "is writing" in proc.stderr
    assert not out.exists()
    assert not [p for p in place.iterdir() if p.name.startswith(".lrq-lock")]
