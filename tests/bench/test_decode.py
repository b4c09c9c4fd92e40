"""`lrq bench --decode`: the generation loop is the model's greedy decoding, and the report
holds time to first token, per-token latency and tokens/s for every kind of target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lrq_deploy.bench.decode import DecodeOptions, OrtDecoder, TorchDecoder, _generate, make_decoder
from lrq_deploy.cli import main
from lrq_deploy.errors import LrqError


def lrq(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def targets(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    lrq("calibrate", tiny_llama_dir, "-o", root / "w4", "--wbits", "4", "--group-size", "32", "--nsamples", "2", "--seq-len", "16")
    lrq("export", root / "w4", "--onnx", root / "w4.onnx", "--with-past", "--limit", "1")
    lrq("export", root / "w4", "--onnx", root / "w4-prefill.onnx", "--no-verify")
    return {"fp": tiny_llama_dir, "w4": root / "w4", "onnx": root / "w4.onnx", "prefill": root / "w4-prefill.onnx"}


def _tokens(decoder, prompt, new_tokens):
    out = [decoder.prefill(prompt)]
    for _ in range(new_tokens - 1):
        out.append(decoder.step(out[-1]))
    return np.stack(out, axis=1)


def test_decoders_generate_the_greedy_tokens(targets):
    prompt = np.random.default_rng(1).integers(0, 100, (2, 12), dtype=np.int64)
    torch_decoder = make_decoder(targets["w4"], "cpu")
    assert isinstance(torch_decoder, TorchDecoder)
    with torch.no_grad():
        expected = torch_decoder.model.generate(torch.from_numpy(prompt), max_new_tokens=6, min_new_tokens=6,
                                                do_sample=False)[:, 12:].numpy()
    assert (_tokens(torch_decoder, prompt, 6) == expected).all()
    ort_decoder = make_decoder(targets["onnx"], "cpu")
    assert isinstance(ort_decoder, OrtDecoder)
    assert (_tokens(ort_decoder, prompt, 6) == expected).all()


def test_cache_kept_in_place_generates_what_the_copying_graph_generates(targets, tmp_path):
    """The graph lrq export --genai writes takes an attention mask; OrtDecoder binds one buffer per
    layer as its past and present (grown when the generation outlives what was reserved), and the
    greedy tokens are those of the graph that copies its cache every step."""
    import onnx

    from lrq_deploy.export import export_onnx

    graph = tmp_path / "in-place.onnx"
    report = export_onnx(targets["w4"], graph, with_past=True, kv_in_place=True, limit=1)
    assert report["kv_cache_in_place"] and report["verify"]["within_tolerance"] and report["verify_generation"]["match"]
    model = onnx.load(str(graph))
    assert [i.name for i in model.graph.input][:2] == ["input_ids", "attention_mask"]
    assert not any(n.op_type == "Shape" and n.input[0].startswith("past.") for n in model.graph.node)
    prompt = np.random.default_rng(2).integers(0, 100, (2, 12), dtype=np.int64)
    in_place = make_decoder(graph, "cpu")
    assert in_place.in_place and "cache in place" in in_place.description
    in_place.reserve(14)  # the generation needs 12 + 7 positions
    assert (_tokens(in_place, prompt, 8) == _tokens(make_decoder(targets["onnx"], "cpu"), prompt, 8)).all()
    assert in_place.capacity > 14


def test_a_prompt_prefilled_in_chunks_generates_what_one_pass_generates(targets):
    """--prefill-chunk: a 12-token prompt in pieces of 5, 5 and 2, each extending the cache, then the
    same greedy tokens as the prompt in one pass (torch at batch 2; the onnxruntime graph at batch 1,
    the most onnxruntime's GroupQueryAttention extends by several tokens, refused in one line above)."""
    from lrq_deploy.bench.decode import measure_decode

    prompt = np.random.default_rng(3).integers(0, 100, (2, 12), dtype=np.int64)
    for target, batch in (("w4", 2), ("onnx", 1)):
        decoder = make_decoder(targets[target], "cpu")
        chunked = [decoder.prefill_in_chunks(prompt[:batch], 5)]
        for _ in range(5):
            chunked.append(decoder.step(chunked[-1]))
        assert (np.stack(chunked, axis=1) == _tokens(decoder, prompt[:batch], 6)).all(), target
    result = measure_decode(decoder, DecodeOptions(prompt_len=12, new_tokens=3, runs=1, prefill_chunk=5))
    assert result["prefill_chunks"] == 3 and "prefilled in 3 chunks of 5" in result["workload"]
    with pytest.raises(LrqError, match="GroupQueryAttention extends a cache by several tokens for one sequence only"):
        measure_decode(decoder, DecodeOptions(batch=2, prompt_len=12, new_tokens=3, runs=1, prefill_chunk=5))


def test_generation_times_every_step(targets):
    decoder = make_decoder(targets["fp"], "cpu")
    ttft, steps = _generate(decoder, np.zeros((1, 8), dtype=np.int64), 5)
    assert ttft > 0 and len(steps) == 4 and all(s > 0 for s in steps)


def test_cli_decode_compare(targets, tmp_path):
    out = tmp_path / "decode.json"
    result = lrq("bench", "--decode", "--compare", targets["fp"], targets["w4"], targets["onnx"], "--prompt-len", "16",
                 "--new-tokens", "4", "--iterations", "1", "--batch", "2", "--export-json", out)
    assert "Time to first token" in result.stdout and "tokens/s" in result.stdout
    table = result.stdout.strip().splitlines()[-3:]
    assert table[0].rstrip().endswith("1.00x")
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["torch", "torch", "ort"]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 and r["batch"] == 2 and r["new_tokens"] == 4
        assert r["prefill_chunks"] == 1
        assert r["token_latency_ms"]["min"] <= r["token_latency_ms"]["median"] <= r["token_latency_ms"]["max"]


def test_decode_refusals(targets):
    with pytest.raises(LrqError, match="export it with lrq export --with-past"):
        make_decoder(targets["prefill"], "cpu")
    with pytest.raises(LrqError, match="exceeds the model's 256 positions"):
        from lrq_deploy.bench.decode import measure_decode

        measure_decode(make_decoder(targets["fp"], "cpu"), DecodeOptions(prompt_len=250, new_tokens=10))
    with pytest.raises(LrqError, match="--new-tokens must be >= 2"):
        DecodeOptions(new_tokens=1)
    with pytest.raises(LrqError, match="--prefill-chunk must be >= 1"):
        DecodeOptions(prefill_chunk=0)
    with pytest.raises(LrqError, match="causal language models"):
        make_decoder(__import__("lrq_deploy.models", fromlist=["BUNDLED"]).BUNDLED["bundled:vit"], "cpu")
