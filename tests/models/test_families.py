"""The decoder families beyond LLaMA / OPT (tiny random configs): Qwen3 (q/k norms), Phi-3 (fused
qkv and gate_up projections), Gemma 2 and Gemma 3 text ((1 + weight) norms, extra norms, soft-capping,
sliding-window layers with their own masks and rotary tables). Each: smoothing folds exactly,
the block chain replays the model, every method calibrates, and the quantized graph verifies in
onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import invoke
from conftest import _save_hf
from lrq_deploy.calib.registry import method_names
from lrq_deploy.fold import fold_smoothing
from lrq_deploy.models import load_model

COMMON = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(family: str):
    import transformers

    if family == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=16)
    if family == "phi3":
        return transformers.Phi3Config(**COMMON)
    if family == "gemma2":
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    # Gemma 3: sliding layers (local rotary base) around a full one; the window is shorter than the test windows
    return transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=8,
                                         query_pre_attn_scalar=16,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])


LEARNABLE = ("omniquant", "lrquant", "lrquant+")
FAMILIES = {"qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma", "gemma3_text": "gemma"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param))
    with torch.no_grad():  # non-trivial norm weights: Gemma's start at 0 (a scale of 1)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.rand_like(param) * 0.5)
    return request.param, _save_hf(model, tmp_path_factory.mktemp(request.param))


def test_family_adapter_serves_the_model_type(family_dir):
    model_type, path = family_dir
    loaded = load_model(str(path))
    assert loaded.adapter.family == FAMILIES[model_type]


def test_smoothing_folds_exactly(family_dir):
    """Every smoothing group with random scales (and LRQuant+-style gains of 1) leaves the model's
    function unchanged: the table names modules that really share inputs, rows and norms included."""
    _, path = family_dir
    loaded = load_model(str(path))
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
        gen = torch.Generator().manual_seed(2)
        for block in loaded.adapter.blocks(loaded.model):
            for group in loaded.adapter.smooth_groups(loaded.model):
                consumer = block.get_submodule(group.linears[0])
                channels = consumer.in_features // group.repeat
                fold_smoothing(block, group, torch.rand(channels, generator=gen) * 2 + 0.25)
        after = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_block_chain_replays_the_model(family_dir):
    """Captured block inputs with each layer type's own keyword arguments (mask, rotary tables)
    run block by block to the model's own hidden states."""
    _, path = family_dir
    loaded = load_model(str(path))
    adapter, model = loaded.adapter, loaded.model
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inputs = adapter.capture_block_inputs(model, [ids])
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
        hidden = inputs.hidden
        for index, block in enumerate(adapter.blocks(model)):
            torch.testing.assert_close(hidden, want[index], rtol=1e-5, atol=1e-5)
            hidden = adapter.run_block(block, hidden, inputs.kwargs_for(index))


@pytest.mark.parametrize("method", method_names())
def test_every_method_calibrates(family_dir, tmp_path, method):
    model_type, path = family_dir
    epochs = ["--epochs", "1"] if method in LEARNABLE else []
    result = invoke("-q", "calibrate", path, "-o", tmp_path / "q", "--method", method, "--wbits", "4", "--abits", "8",
                    "--nsamples", "2", "--seq-len", "16", *epochs, "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    per_block = 4 if model_type == "phi3" else 7  # fused qkv / gate_up: 4 linears a block
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    assert len(manifest["quantized_modules"]) == layers * per_block


def test_calibrate_eval_export_verify_info(family_dir, tmp_path):
    """The whole chain: lrquant+ W4A8 g32 -> eval -> onnxruntime graph with a KV cache verified -> info."""
    _, path = family_dir
    ckpt, graph = tmp_path / "q", tmp_path / "q.onnx"
    result = invoke("-q", "calibrate", path, "-o", ckpt, "--method", "lrquant+", "--wbits", "4", "--abits", "8",
                    "--group-size", "32", "--nsamples", "2", "--seq-len", "16", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = invoke("eval", ckpt, "--limit", "2", "--seq-len", "32", "--no-fp-cache", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["quant"]["ppl"] < 1.5 * figures["fp"]["ppl"]
    result = invoke("-q", "export", ckpt, "--onnx", graph, "--target", "ort", "--with-past", "--limit", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(graph.with_name("q.onnx.verify.json").read_text())
    assert report["verify"]["within_tolerance"]
    # 16 prompt tokens + 8 decoded: past the 8-token sliding window of the Gemma configs
    assert report["verify_generation"]["match"], report["verify_generation"]
    result = invoke("info", graph, "--json")
    assert result.exit_code == 0 and not json.loads(result.output)["problems"], result.output
