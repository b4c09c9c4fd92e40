"""The decoder families beyond LLaMA / OPT (tiny random configs, models/tiny.py): Qwen3 (q/k norms),
Phi-3 (fused qkv and gate_up projections), Gemma 2 and Gemma 3 text ((1 + weight) norms, extra norms,
soft-capping, sliding-window layers with their own masks and rotary tables), Mixtral and Qwen3-MoE
(experts as linears, router in the smoothing group). Each: lrq's model computes what transformers'
does, smoothing folds exactly, the block chain replays the model, every method calibrates, and the
quantized graph with its KV cache verifies in onnxruntime (logits and greedy tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import invoke
from conftest import _save_hf
from lrq_deploy.calib.registry import method_names
from lrq_deploy.fold import fold_smoothing
from lrq_deploy.models import load_model
from lrq_deploy.models.tiny import tiny_model

LEARNABLE = ("omniquant", "lrquant", "lrquant+")
FAMILIES = {"qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma", "gemma3_text": "gemma", "mixtral": "moe",
            "qwen3_moe": "moe"}
LINEARS_PER_BLOCK = {"phi3": 4, "mixtral": 4 + 2 * 4, "qwen3_moe": 4 + 2 * 4}  # fused qkv / gate_up; 4 experts


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, _save_hf(tiny_model(request.param), tmp_path_factory.mktemp(request.param))


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
    per_block = LINEARS_PER_BLOCK.get(model_type, 7)
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
    assert report["attention"] == "GroupQueryAttention"  # windows, soft-capping, q/k norms, per-layer rotary tables
    # 16 prompt tokens + 8 decoded: past the 8-token sliding window of the Gemma configs
    assert report["verify_generation"]["match"], report["verify_generation"]
    result = invoke("info", graph, "--json")
    assert result.exit_code == 0 and not json.loads(result.output)["problems"], result.output


def test_loaded_model_computes_what_transformers_does(family_dir):
    """lrq's model (experts rewritten as linears for the MoE families) has the logits of the
    transformers model read from the same directory: long windows (experts routed many tokens)
    and single tokens (experts routed none: run on every token with weight 0)."""
    from transformers import AutoModelForCausalLM

    _, path = family_dir
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = load_model(str(path))
    for shape in ((2, 32), (1, 1)):
        ids = torch.randint(0, 2048, shape, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_moe_offload_is_refused_in_one_line(tmp_path):
    path = _save_hf(tiny_model("mixtral"), tmp_path / "mixtral")
    result = invoke("calibrate", path, "-o", tmp_path / "q", "--offload")
    assert result.exit_code != 0 and "--offload does not serve moe models" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_rotated_checkpoint_exports_and_decodes(family_dir, tmp_path):
    """--rotate on every family that can be rotated: calibrated W4A4 with the online transform before
    each down_proj (each expert's too), its --with-past graph verified (logits and greedy tokens)."""
    model_type, path = family_dir
    if load_model(str(path)).adapter.rotation_layout(load_model(str(path)).model) is None:
        pytest.skip(f"{model_type} is not rotated (post-norms)")
    ckpt, graph = tmp_path / "q", tmp_path / "g.onnx"
    result = invoke("-q", "calibrate", path, "-o", ckpt, "--wbits", "4", "--abits", "4", "--rotate", "hadamard",
                    "--nsamples", "2", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    result = invoke("-q", "export", ckpt, "--onnx", graph, "--target", "ort", "--with-past", "--limit", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "g.onnx.verify.json").read_text())
    assert report["verify"]["within_tolerance"] and report["verify_generation"]["match"], report
