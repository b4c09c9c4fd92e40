import json

import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.errors import LrqError
from lrq_deploy.models import load_model

CASES = [
    ("tiny_llama_dir", QuantScheme(wbits=4, abits=16, group_size=32), "rtn"),
    ("tiny_llama_dir", QuantScheme(wbits=8, abits=8, act_asym=False), "smoothquant"),
    ("tiny_opt_dir", QuantScheme(wbits=2, abits=16, group_size=16), "rtn"),
    ("tiny_opt_dir", QuantScheme(wbits=4, abits=4, symmetric=True, act_asym=False), "smoothquant"),
]


def _calibrated_model(source, out, qconfig, method):
    """Calibrate through the public API and keep the in-memory quantized model for comparison."""
    from lrq_deploy.calib import blockwise

    kept = {}
    original = blockwise.calibrate_model

    def keep(*args, **kwargs):
        kept["result"] = original(*args, **kwargs)
        return kept["result"]

    engine_fn = "lrq_deploy.calib.api.calibrate_model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_fn, keep)
        seqlen = None if str(source).endswith("vit") else 32
        calibrate(str(source), out, qconfig, CalibConfig.of(method=method, nsamples=4, seqlen=seqlen), device="cpu")
    return kept["result"].model


@pytest.mark.parametrize("fixture,qconfig,method", CASES)
def test_reload_reproduces_calibrated_outputs_exactly(fixture, qconfig, method, request, tmp_path):
    source = request.getfixturevalue(fixture)
    out = tmp_path / "ckpt"
    calibrated = _calibrated_model(source, out, qconfig, method)
    ckpt = load_checkpoint(out)
    loaded, manifest = ckpt.loaded, ckpt.manifest
    assert manifest["quant"] == qconfig.to_dict() and manifest["calib"]["method"] == method
    # the typed view is the manifest parsed once
    assert ckpt.quant == qconfig and ckpt.method == method and ckpt.scheme.group_size == qconfig.group_size
    assert ckpt.quantized_modules == tuple(manifest["quantized_modules"]) and ckpt.source == manifest["source"]
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = calibrated(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_vit_reload_exact(tmp_path):
    out = tmp_path / "vit"
    calibrated = _calibrated_model("bundled:vit", out, QuantScheme(wbits=4, abits=4, act_asym=False), "smoothquant")
    loaded = load_checkpoint(out).loaded
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(images), calibrated(images))


def test_checkpoint_weights_are_packed(tmp_path, tiny_llama_dir):
    from safetensors import safe_open

    out = tmp_path / "w2"
    calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=2, group_size=32), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.0.mlp.up_proj.qweight")
        scales = f.get_tensor("model.layers.0.mlp.up_proj.scales")
    assert qweight.dtype == torch.uint8 and qweight.shape == (128, 64 // 4)
    assert scales.dtype == torch.float16 and scales.shape == (128, 2)


def test_truncated_weights_are_reported(tmp_path, tiny_llama_dir):
    out = tmp_path / "t"
    calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=4), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LrqError, match=r"model.safetensors does not match manifest.json \(size differs\)"):
        load_checkpoint(out)
    manifest = json.loads((out / "manifest.json").read_text())  # a format-1 manifest records no hashes:
    del manifest["files"], manifest["manifest_sha256"]  # the safetensors reader still refuses the truncated file
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LrqError, match="corrupt or truncated"):
        load_checkpoint(out)


def test_newer_format_version_is_refused(tmp_path, tiny_llama_dir):
    out = tmp_path / "v"
    calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=4), CalibConfig.of(nsamples=2, seqlen=32), device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LrqError, match="format version 99"):
        load_checkpoint(out)


def test_nan_weights_are_refused(tmp_path, tiny_llama_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_llama_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LrqError, match="NaN"):
        load_model(str(bad))
