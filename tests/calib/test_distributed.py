"""Data-parallel calibration with two gloo ranks on CPU against one process on the same samples."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, model, out, qconfig, cconfig):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calibrate(model, out, qconfig, cconfig, device="cpu", distributed=True)


def _distributed(tmp_path, model, qconfig, cconfig, world=2):
    out = tmp_path / "dist"
    mp.spawn(_rank, args=(world, _free_port(), model, out, qconfig, cconfig), nprocs=world, join=True)
    return out


def _single(tmp_path, model, qconfig, cconfig):
    out = tmp_path / "single"
    calibrate(model, out, qconfig, cconfig, device="cpu")
    return out


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method", ["rtn", "smoothquant"])
def test_distributed_statistics_methods_are_bit_identical(tmp_path, tiny_llama_dir, method):
    """Max / min over samples reduce exactly: the same checkpoint bytes as one process."""
    qconfig = QuantScheme(wbits=8, abits=8, act_asym=False)
    cconfig = CalibConfig.of(method=method, nsamples=6, seqlen=32)
    single = _single(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    dist = _distributed(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    a, b = _weights(single), _weights(dist)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distributed_lrquant_plus_matches_one_process(tmp_path, tiny_llama_dir):
    """lrquant+ W4A4, 6 samples in batches of 4 (uneven shares per batch, then a batch of 2).

    The summed gradients equal the single-process batch gradient up to float summation order
    (one batch of all samples: learned parameters agree to 3e-5). Over several steps Adam turns
    that noise into different but equally good trajectories: it divides every gradient element
    by its running RMS, so a near-zero element whose sign flips moves by +-lr. Stated
    tolerance: the same start exactly, each epoch's block MSE within 15% of the single process's
    (the trajectories drift apart step by step; 9% apart after two epochs was seen), the kept
    epochs' MSE within 15%, and the checkpoints' perplexity within 0.5%."""
    from lrq_deploy.checkpoint import load_checkpoint

    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant+", nsamples=6, seqlen=32, epochs=2, batch_size=4)
    single = _single(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    dist = _distributed(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    reports = [json.loads((tmp_path / f"{n}.run" / "report.json").read_text())["training"] for n in ("single", "dist")]
    for block, record in reports[0].items():
        other = reports[1][block]
        assert other["mse_per_epoch"] == pytest.approx(record["mse_per_epoch"], rel=0.15)
        kept = [r["mse_per_epoch"][r["best_epoch"]] for r in (record, other)]
        assert kept[1] == pytest.approx(kept[0], rel=0.15)  # two epochs within noise may swap places
    assert reports[1]["0"]["mse_per_epoch"][0] == reports[0]["0"]["mse_per_epoch"][0]  # same start, exactly
    ppl = [load_checkpoint(p) for p in (single, dist)]
    scores = [c.adapter.evaluate(c.model, c.loaded, None, 4, "cpu")["ppl"] for c in ppl]
    assert scores[1] == pytest.approx(scores[0], rel=0.005)


def test_distributed_one_batch_step_equals_one_process(tmp_path, tiny_llama_dir):
    """One step over all samples: the summed gradients equal the single-process gradient up to
    summation order, and Adam's first step moves every element by +-lr times the sign of its
    gradient. Elements whose gradient is ~0 may take either sign: stated tolerance, no element
    apart by more than 2 lr, and at most one element or 1% of each tensor apart by more than 1e-4.
    Checked on block 0, whose inputs are the same in both runs: block 1 sees block 0's slightly
    different output, and its searched start (a clipping ratio per weight group) may differ."""
    qconfig = QuantScheme(wbits=4, abits=4, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant+", nsamples=6, seqlen=32, epochs=1, batch_size=6)
    _single(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    _distributed(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    for block in ("block_000",):
        a = load_file(str(tmp_path / "single.run" / f"{block}.safetensors"))
        b = load_file(str(tmp_path / "dist.run" / f"{block}.safetensors"))
        for name in a:
            apart = (a[name] - b[name]).abs()
            lr = cconfig.options.lr_lwc if name.startswith("lwc") else cconfig.options.lr_smooth
            assert apart.max() <= 2 * lr + 1e-6, (block, name)
            assert (apart > 1e-4).sum() <= max(1, 0.01 * apart.numel()), (block, name)


def test_distributed_without_torchrun_is_one_line(tmp_path, tiny_llama_dir, monkeypatch):
    from click.testing import CliRunner

    from lrq_deploy.cli import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["calibrate", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--distributed"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[0].startswith("error: --distributed runs under torchrun")
    assert not (tmp_path / "o").exists()


def _rank_that_may_die(rank, world, port, model, out, message_file):
    """Rank 1 dies (os._exit) when it reaches block 1; rank 0 records what it was told."""
    from dataclasses import replace

    from lrq_deploy.calib import registry
    from lrq_deploy.errors import LrqError

    if rank == 1:  # this process only (spawned): its rtn dies at block 1
        rtn = registry.get_method("rtn")
        registry._REGISTRY["rtn"] = replace(rtn, quantize_block=lambda job: os._exit(3) if job.index == 1
                                            else rtn.quantize_block(job))
    try:
        _rank(rank, world, port, model, out, QuantScheme(wbits=8), CalibConfig.of(method="rtn", nsamples=4, seqlen=32))
    except LrqError as exc:
        message_file.write_text(str(exc))


def test_distributed_rank_that_dies_ends_the_job_with_one_line(tmp_path, tiny_llama_dir):
    """Rank 1 dies at block 1; rank 0, waiting in a reduction, ends within seconds with one line
    (no hang, no checkpoint). Started as plain processes so that no launcher kills rank 0 first."""
    import time

    message, port = tmp_path / "rank0.txt", _free_port()
    context = mp.get_context("spawn")
    ranks = [context.Process(target=_rank_that_may_die,
                             args=(rank, 2, port, str(tiny_llama_dir), tmp_path / "out", message)) for rank in (0, 1)]
    start = time.monotonic()
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [p.exitcode for p in ranks] == [0, 3]
    assert time.monotonic() - start < 120  # no hang
    text = message.read_text()
    assert text.startswith("rank 0: another calibration rank stopped") and "\n" not in text
    assert not (tmp_path / "out").exists()


def _rank_resumed(rank, world, port, model, out, qconfig, cconfig):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calibrate(model, out, qconfig, cconfig, device="cpu", distributed=True, resume=True)


def test_distributed_resume_uses_the_saved_blocks(tmp_path, tiny_llama_dir):
    """A distributed run whose block 1 parameters were lost resumes from block 0's saved parameters
    (read by every rank) and retrains only block 1: block 0's file is untouched."""
    qconfig = QuantScheme(wbits=4, abits=8, group_size=32, act_asym=False)
    cconfig = CalibConfig.of(method="lrquant", nsamples=4, seqlen=32, epochs=1, batch_size=2)
    out = _distributed(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    run = tmp_path / "dist.run"
    block0 = (run / "block_000.safetensors").read_bytes()
    first = _weights(out)
    (run / "block_001.safetensors").unlink()
    import shutil

    shutil.rmtree(out)
    mp.spawn(_rank_resumed, args=(2, _free_port(), str(tiny_llama_dir), out, qconfig, cconfig), nprocs=2, join=True)
    assert (run / "block_000.safetensors").read_bytes() == block0
    again = _weights(out)
    assert all(torch.equal(first[k], again[k]) for k in first)  # same samples, same sums: same result


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_distributed_rounding_methods_match_one_process(tmp_path, tiny_llama_dir, method):
    """GPTQ's Hessians and AWQ's search losses are summed over the ranks: the ranks see every
    sample, as one process does. Sums in another order differ in the last bits, so a code may
    round the other way; stated tolerance: 99.5% of the packed weight bytes equal, perplexity
    within 0.5%."""
    from lrq_deploy.checkpoint import load_checkpoint

    qconfig = QuantScheme(wbits=3, group_size=32)
    cconfig = CalibConfig.of(method=method, nsamples=6, seqlen=32)
    single = _single(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    dist = _distributed(tmp_path, str(tiny_llama_dir), qconfig, cconfig)
    a, b = _weights(single), _weights(dist)
    packed = [k for k in a if k.endswith("qweight")]
    equal = sum((a[k] == b[k]).sum().item() for k in packed) / sum(a[k].numel() for k in packed)
    assert equal > 0.995
    scores = [c.adapter.evaluate(c.model, c.loaded, None, 4, "cpu")["ppl"] for c in map(load_checkpoint, (single, dist))]
    assert scores[1] == pytest.approx(scores[0], rel=0.005)
