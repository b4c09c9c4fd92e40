"""--effective-bits: bits counted as deployed, the knapsack choice, the search through calibrate
(table in the manifest and the run directory, budget met, reload) and its bad inputs."""

from __future__ import annotations

import json

import pytest

from cli_runner import invoke as lrq
from lrq_deploy.calib.auto_scheme import Searched, _choose, candidate_schemes
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.errors import LrqError
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.layer_schemes import effective_bits
from lrq_deploy.quant.scheme import QuantScheme

FAST = ["--nsamples", "4", "--seq-len", "32"]


def test_effective_bits_count_codes_scales_and_zero_points():
    assert effective_bits(QuantScheme(wbits=4, group_size=128), 4096) == 4 + (16 + 4) / 128
    assert effective_bits(QuantScheme(wbits=4, group_size=128, symmetric=True), 4096) == 4 + 16 / 128
    assert effective_bits(QuantScheme(wbits=3), 256) == 3 + 19 / 256  # one group per output channel
    assert effective_bits(QuantScheme.preset("w4a16-nvfp4"), 64) == 4 + 8 / 16  # E4M3 block scales
    assert effective_bits(None, 64) == 16.0


@pytest.mark.parametrize("target", [2.3, 3.0, 3.6, 5.0])
def test_the_choice_is_the_least_error_that_fits(target):
    """Against every assignment: the choice fits the budget, and no assignment that fits with room for the
    rounding of costs to the budget's steps has less error."""
    import itertools

    import torch

    from lrq_deploy.calib.auto_scheme import BUDGET_STEPS

    gen = torch.Generator().manual_seed(0)
    bits = {"W2": 2.25, "W3": 3.1, "W4": 4.25, "W8": 8.0}
    rows = []
    for i in range(6):
        errors = sorted(torch.rand(4, generator=gen).tolist(), reverse=True)
        rows.append(Searched(f"l{i}", int(torch.randint(50, 400, (), generator=gen)), bits, dict(zip(bits, errors))))
    total = sum(r.params for r in rows)
    _choose(rows, target)
    assert sum(r.bits[r.chosen] * r.params for r in rows) <= target * total
    slack = target * total * (1 - len(rows) / BUDGET_STEPS)
    best = min(sum(r.errors[c] for r, c in zip(rows, combo)) for combo in itertools.product(bits, repeat=len(rows))
               if sum(r.bits[c] * r.params for r, c in zip(rows, combo)) <= slack)
    assert sum(r.errors[r.chosen] for r in rows) <= best + 1e-12


def test_candidates_are_weight_only_schemes():
    assert [c.name for c in candidate_schemes("w3a16,w4a16-g64", QuantScheme())] == ["W3A16", "W4A16-g64"]
    with pytest.raises(LrqError, match="chooses weight-only schemes"):
        candidate_schemes("w4a8,w4a16", QuantScheme())
    with pytest.raises(LrqError, match="at least two"):
        candidate_schemes("w4a16", QuantScheme())


@pytest.mark.parametrize("method", ["gptq", "lrquant"])
def test_search_through_calibrate(tiny_llama_dir, tmp_path, method):
    out = tmp_path / "ckpt"
    extra = ["--epochs", "1"] if method == "lrquant" else []
    result = lrq("calibrate", tiny_llama_dir, "-o", out, "--method", method, *FAST, *extra, "--effective-bits", "3.5",
                 "--candidates", "w2a16-g32,w3a16-g32,w4a16-g32,w8a16", "--scheme-for", "lm_head=w8a16")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    search = manifest["layer_schemes"]["search"]
    assert search["achieved_bits"] <= 3.5 and len(search["table"]) == 14  # 7 linears x 2 blocks; the head is ruled
    assert search["given"]["rules"][0]["pattern"] == "lm_head"
    model = load_checkpoint(out).model
    for row in search["table"]:
        assert model.get_submodule(row["name"]).config.name == row["chosen"]
        assert set(row["errors"]) == {"W2A16-g32", "W3A16-g32", "W4A16-g32", "W8A16"}
    assert model.get_submodule("lm_head").config.name == "W8A16"
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m is not model.get_submodule("lm_head")]
    assert len({m.config.name for m in layers}) > 1
    if method == "lrquant":
        assert json.loads((tmp_path / "ckpt.run" / "scheme_search.json").read_text())["table"] == search["table"]
    assert "searched for 3.5 bits per weight" in lrq("info", out).output


def test_budget_bad_inputs(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--effective-bits", "1.5")
    assert result.exit_code != 0 and "is below the smallest the candidates reach" in result.output
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--candidates", "w3a16,w4a16")
    assert result.exit_code != 0 and "goes with --effective-bits" in result.output
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--effective-bits", "4",
                 "--candidates", "w3a16-g48,w4a16-g48")
    assert result.exit_code != 0 and "no candidate's group size divides the input size 64" in result.output
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--effective-bits", "3", "--offload")
    assert result.exit_code != 0 and "drop --offload" in result.output
    assert not out.exists()
