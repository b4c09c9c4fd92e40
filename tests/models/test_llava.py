"""LLaVA-style multimodal models: language-model blocks calibrated on image + text samples,
evaluated against full precision, the language model exported and verified in onnxruntime."""

import json

import pytest
import torch

from lrq_deploy.calib import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.eval import evaluate_checkpoint
from lrq_deploy.export import export_onnx
from lrq_deploy.models import load_model
from lrq_deploy.models.llava import TEXT_TOKENS


def test_llava_samples_carry_the_image_tokens(tiny_llava_dir):
    loaded = load_model(str(tiny_llava_dir))
    batches = loaded.adapter.calibration_batches(loaded, None, 4, None, seed=0)
    image_token = loaded.model.config.image_token_id
    for ids, pixels in batches:
        assert ids.shape == (1, 16 + 1 + TEXT_TOKENS) and pixels.shape == (1, 3, 16, 16)
        assert (ids == image_token).sum() == 16  # the processor expanded <image> to the tower's 16 patches
    assert not torch.equal(batches[0][1], batches[1][1])  # different images


def test_llava_calibrates_evaluates_exports_and_verifies(tiny_llava_dir, tmp_path):
    result = calibrate(str(tiny_llava_dir), tmp_path / "q", QuantScheme(wbits=4, abits=8, act_asym=False),
                       CalibConfig.of(method="lrquant", nsamples=8, epochs=1), device="cpu")
    assert len(result["blocks"]) == 2  # the language model's blocks
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["family"] == "llava"
    assert all(name.startswith("model.language_model.layers.") for name in manifest["quantized_modules"])
    agreement = evaluate_checkpoint(tmp_path / "q", limit=16, device="cpu")["agreement"]
    assert agreement["rows"] == 16 * TEXT_TOKENS
    assert 0.95 < agreement["cosine_mean"] < 1.0 and 0.5 < agreement["top1_agreement"] <= 1.0
    report = export_onnx(tmp_path / "q", tmp_path / "llava.onnx", limit=8)
    verify = report["verify"]
    assert verify["output"] == "logits" and verify["logits"]["cosine"] > 0.9999
    assert verify["argmax_agreement"] > 0.99  # int8 activations: rare rounding-boundary flips only


def test_llava_fp_language_model_graph_matches_torch(tiny_llava_dir, tmp_path):
    report = export_onnx(str(tiny_llava_dir), tmp_path / "fp.onnx", limit=4)
    assert report["verify"]["logits"]["passed"] and report["verify"]["argmax_agreement"] == 1.0


def test_llava_with_an_unsupported_language_model_is_refused(tiny_llava_dir, tmp_path):
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(tiny_llava_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(LrqError, match="LLaVA with a 'gemma' language model is not supported"):
        load_model(str(broken))
