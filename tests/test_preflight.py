"""What can be known before the work is checked before it: free disk space against the output's
size, memory against the calibration set, and a disk that fills during a write ends in one line
with nothing left at the output."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple


from lrq_deploy import atomic
from lrq_deploy.calib import blockwise
from cli_runner import invoke

Usage = namedtuple("Usage", "total used free")
FAST = ["--nsamples", "2", "--seq-len", "16"]


def lrq(*args):
    result = invoke(*args)
    return result.exit_code, result.output.strip().splitlines()


def test_outputs_the_disk_cannot_hold_are_refused_before_any_work(tiny_llama_dir, tmp_path, monkeypatch):
    code, _ = lrq("calibrate", tiny_llama_dir, "-o", tmp_path / "ckpt", *FAST)
    assert code == 0
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - 4096, 4096))
    for args in (["calibrate", tiny_llama_dir, "-o", tmp_path / "again", *FAST],
                 ["export", tmp_path / "ckpt", "--onnx", tmp_path / "g.onnx", "--no-verify"]):
        code, lines = lrq(*args)
        assert code == 1 and len(lines) == 1, lines
        assert "has 4.0 KiB free, and the output needs at least" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_calibration_set_beyond_memory_is_refused_before_the_first_block(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(blockwise, "available_memory", lambda: 1 << 20)
    def first_block(*args, **kwargs):
        raise RuntimeError("reached the first block")

    monkeypatch.setattr(blockwise, "run_block", first_block)
    code, lines = lrq("calibrate", tiny_llama_dir, "-o", tmp_path / "q", "--nsamples", "64", "--seq-len", "128")
    assert code == 1 and len(lines) == 1, lines
    assert "the calibration set needs about" in lines[0] and "--offload disk" in lines[0], lines[0]
    assert not (tmp_path / "q").exists()
    code, lines = lrq("calibrate", tiny_llama_dir, "-o", tmp_path / "q", "--nsamples", "64", "--seq-len", "128",
                      "--offload", "disk")
    assert code == 1 and "reached the first block" in lines[-1]  # block activations in files: no memory limit


def test_a_disk_that_fills_during_the_write_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    code, lines = lrq("calibrate", tiny_llama_dir, "-o", tmp_path / "q", *FAST)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: no space left on the device while writing") and "please report" not in lines[0]
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_disk_that_fills_during_a_learnable_run_keeps_what_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch

    from lrq_deploy.calib import rundir

    args = ["calibrate", tiny_llama_dir, "-o", tmp_path / "q", "--method", "lrquant", "--epochs", "1", *FAST]
    real_write_json = rundir.write_json

    def settings_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "write_json", settings_full)  # the run's settings cannot be written
    code, lines = lrq(*args)
    assert code == 1 and "no space left on the device" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no run directory without its settings
    monkeypatch.setattr(rundir, "write_json", real_write_json)

    real_save, saved = safetensors.torch.save_file, []

    def second_block_full(tensors, path, *args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        saved.append(path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", second_block_full)
    code, lines = lrq(*args)
    assert code == 1 and len(lines) == 1, lines
    assert "while saving block 1" in lines[0] and "its 1 finished blocks are kept" in lines[0] and "--resume" in lines[0]
    assert (tmp_path / "q.run" / "block_000.safetensors").is_file() and not (tmp_path / "q").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    code, lines = lrq(*args, "--resume")
    assert code == 0 and (tmp_path / "q" / "manifest.json").is_file(), lines
