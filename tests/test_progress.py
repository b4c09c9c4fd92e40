"""Progress of the long steps, as a user sees it: drawn on a terminal (the commands run under a
pseudo-terminal here), absent with --quiet and in pipes (every CliRunner test reads clean output)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lrq_deploy.cli import main

LRQ = [sys.executable, "-c", "from lrq_deploy.cli import main; main()"]


def run_on_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """(exit status, everything the command wrote) with stdin, stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "LRQ_QUIET"}
    proc = subprocess.Popen([*LRQ, *map(str, args)], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                pytest.fail(f"lrq {' '.join(map(str, args))} printed nothing for {timeout} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed: the command exited
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "q"
    result = CliRunner().invoke(main, ["calibrate", str(tiny_llama_dir), "-o", str(out), "--nsamples", "2",
                                       "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    return out


def test_eval_and_export_show_progress_on_a_terminal(checkpoint, tmp_path):
    code, shown = run_on_terminal(["eval", checkpoint, "--limit", "24", "--seq-len", "32", "--no-fp-cache"])
    assert code == 0, shown
    assert "loading the full-precision model ..." in shown
    assert "perplexity:" in shown and "batch" in shown  # the bar, drawn while windows are evaluated
    assert "full precision" in shown and "rtn W4A16" in shown

    code, shown = run_on_terminal(["export", checkpoint, "--onnx", tmp_path / "g.onnx", "--limit", "2"])
    assert code == 0, shown
    for line in ("tracing the model (torch.export) ...", "lowering the quantized linears for ort ...",
                 "checking the graph (onnx.checker) ...", "verifying onnxruntime against torch ..."):
        assert line in shown, shown


def test_quiet_draws_nothing_on_a_terminal(checkpoint):
    code, shown = run_on_terminal(["--quiet", "eval", checkpoint, "--limit", "24", "--seq-len", "32", "--no-fp-cache"])
    assert code == 0, shown
    assert "perplexity:" not in shown and " ..." not in shown
    assert [line.split()[0] for line in shown.strip().splitlines()] == ["model", "full", "rtn"]
