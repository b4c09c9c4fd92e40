"""--quantize-head: the output head quantized with the blocks' scheme and the method's rounding,
recorded in the checkpoint, exported like every other linear; a tied head is untied."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from safetensors.torch import load_file

from lrq_deploy.calib.distributed import SINGLE
from lrq_deploy.calib.head import HeadJob, gptq_rounding, round_to_nearest
from lrq_deploy.checkpoint import load_checkpoint
from cli_runner import invoke as lrq
from lrq_deploy.export import export_onnx
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.scheme import QuantScheme

FAST = ["--nsamples", "4", "--seq-len", "32"]




@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    """A tiny LLaMA whose head shares its weight with the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _save_hf

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return _save_hf(model, tmp_path_factory.mktemp("tied-llama"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_head_is_untied_quantized_recorded_and_exported(tied_llama_dir, tmp_path, method):
    out = tmp_path / "q"
    result = lrq("calibrate", tied_llama_dir, "-o", out, "--method", method, "--wbits", "4", "--group-size", "32",
                 "--quantize-head", *FAST)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantized_modules"][-1] == "lm_head" and manifest["calib"]["quantize_head"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    source = load_file(str(tied_llama_dir / "model.safetensors"))
    stored = load_file(str(out / "model.safetensors"))
    embeddings = next(v for k, v in source.items() if k.endswith("embed_tokens.weight"))
    assert torch.equal(stored["model.embed_tokens.weight"], embeddings)  # embeddings stay full precision
    assert {"lm_head.qweight", "lm_head.scales", "lm_head.zeros"} <= set(stored) and "lm_head.weight" not in stored

    ckpt = load_checkpoint(out)
    head = ckpt.model.lm_head
    assert isinstance(head, QuantLinear) and ckpt.model.model.embed_tokens.weight is not getattr(head, "weight", None)
    error = (head.dequantized_weight().float() - embeddings).abs().max()
    assert 0 < error < embeddings.abs().max() / 4  # rounded at 4 bits, not replaced
    report = json.loads(lrq("eval", out, "--json", "--limit", "4").stdout)
    assert report["quant"]["ppl"] == pytest.approx(report["fp"]["ppl"], rel=0.1)

    graph = tmp_path / "q.onnx"
    report = export_onnx(out, graph, target="ort", limit=2)
    assert report["verify"]["within_tolerance"] and report["verify"]["relative_difference"] < 1e-4
    names = {n.name for n in onnx.load(str(graph)).graph.node}
    lowered = sum(name.endswith(".dq") for name in names)
    assert lowered + report["fused_linears"] == len(manifest["quantized_modules"])  # the head among them


def test_gptq_head_rounding_beats_nearest_on_its_inputs():
    """On correlated inputs, GPTQ's head has lower output error than round to nearest (same scales)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 256, bias=False)
    mix = torch.randn(64, 64) / 8
    x = torch.randn(2048, 64) @ mix + torch.randn(2048, 64) * 0.05
    scheme = QuantScheme(wbits=3, group_size=32)
    job = HeadJob(linear, scheme, None, SINGLE, lambda: x)
    reference = x @ linear.weight.T
    errors = {name: ((x @ rounding(job).dequantized_weight().float().T) - reference).pow(2).mean()
              for name, rounding in (("nearest", round_to_nearest), ("gptq", gptq_rounding))}
    assert errors["gptq"] < 0.8 * errors["nearest"]


def test_vit_head_and_refusal_for_a_model_without_one(tmp_path, tiny_bert_dir):
    out = tmp_path / "vit"
    result = lrq("calibrate", "bundled:vit", "-o", out, "--quantize-head", "--nsamples", "16")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["quantized_modules"][-1] == "head"
    assert isinstance(load_checkpoint(out).model.head, QuantLinear)
    refused = lrq("calibrate", tiny_bert_dir, "-o", tmp_path / "bert", "--quantize-head", *FAST)
    assert refused.exit_code == 1 and "has no output head to quantize" in refused.output
    assert not (tmp_path / "bert").exists()
