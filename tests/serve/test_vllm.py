"""`lrq export --vllm`: compressed-tensors checkpoints that transformers loads and vLLM serves."""

import json

import pytest
import torch
from click.testing import CliRunner

from lrq_deploy.calib.api import calibrate
from lrq_deploy.cli import main
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.eval import evaluate_checkpoint
from lrq_deploy.models import load_model

pytest.importorskip("compressed_tensors", reason="needs lrq-deploy[serve]")

WINDOWS = 20  # WikiText-2 test windows of 256 tokens


def _export(tmp_path, quant, method="rtn", name="q"):
    calibrate("bundled:llama", tmp_path / name, quant, CalibConfig.of(method=method, nsamples=4, seqlen=64), device="cpu")
    result = CliRunner().invoke(main, ["export", str(tmp_path / name), "--vllm", str(tmp_path / f"{name}-vllm")])
    assert result.exit_code == 0, result.output
    return tmp_path / name, tmp_path / f"{name}-vllm"


def _ppl(model):
    source = load_model("bundled:llama")
    return source.adapter.evaluate(model, source, None, WINDOWS, "cpu")["ppl"]


def test_vllm_w4a16_g64_loads_in_transformers_with_the_checkpoints_perplexity(tmp_path):
    """Symmetric W4A16-g64: AutoModelForCausalLM.from_pretrained, as is (compressed linears,
    decompressed on the fly on CPU), scores WikiText-2 like `lrq eval` of the checkpoint."""
    from transformers import AutoModelForCausalLM

    ckpt, out = _export(tmp_path, QuantScheme(wbits=4, group_size=64, symmetric=True))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 64, True)
    assert config["ignore"] == ["lm_head"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = evaluate_checkpoint(ckpt, limit=WINDOWS, device="cpu", compare_fp=False)["quant"]["ppl"]
    assert _ppl(model) == pytest.approx(reference, rel=0.005)


@pytest.mark.parametrize("quant,fmt", [(QuantScheme(wbits=4, group_size=64), "pack-quantized"),
                                       (QuantScheme(wbits=8), "pack-quantized"),
                                       (QuantScheme(wbits=8, abits=8, act_asym=False), "int-quantized")])
def test_vllm_weights_decompress_to_the_checkpoints(tmp_path, quant, fmt):
    """Asymmetric groups (zero points), per-channel INT8 and W8A8: every decompressed weight equals
    the checkpoint's dequantized weight exactly (the export checks it too, before writing)."""
    from lrq_deploy.checkpoint import load_checkpoint
    from lrq_deploy.export.vllm import load_decompressed
    from lrq_deploy.quant import QuantLinear

    ckpt, out = _export(tmp_path, quant, method="smoothquant" if quant.abits == 8 else "rtn")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == fmt
    model = load_decompressed(out)
    linears = {n: m for n, m in load_checkpoint(ckpt).model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 28
    for name, linear in linears.items():
        assert torch.equal(model.get_submodule(name).weight.float(), linear.dequantized_weight()), name


def test_vllm_refuses_what_the_format_cannot_express(tmp_path):
    calibrate("bundled:llama", tmp_path / "w4a4", QuantScheme(wbits=4, abits=4, act_asym=False), CalibConfig.of(nsamples=2, seqlen=32),
              device="cpu")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "w4a4"), "--vllm", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --vllm cannot express W4A4: compressed-tensors checkpoints support weight-only W4A16 / W8A16 "
        "(per channel or group, symmetric or asymmetric), W8A8, FP8 (W8A8, W8A16) and NVFP4 (W4A4, W4A16)"]
    assert not (tmp_path / "out").exists()
    calibrate("bundled:llama", tmp_path / "mx", QuantScheme.preset("mxfp4"), CalibConfig.of(nsamples=2, seqlen=32),
              device="cpu")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "mx"), "--vllm", str(tmp_path / "out")])
    assert result.exit_code == 1 and "--vllm cannot express W4A4-mxfp4" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset, fmt", [("fp8", "float-quantized"), ("nvfp4", "nvfp4-pack-quantized"),
                                         ("w4a16-nvfp4", "nvfp4-pack-quantized")])
def test_vllm_float_schemes_are_compressed_tensors_own(tmp_path, preset, fmt):
    """FP8 and NVFP4 in compressed-tensors' own layout: the packed E2M1 bytes and E4M3 block scales are
    the checkpoint's (compared as values: compressed-tensors writes a code that rounds to zero as +0
    where lrq keeps the sign), the global scales the reciprocals of its tensor scales (exact: powers
    of two), the input scales the calibrated ones; every weight decompresses to the checkpoint's exactly."""
    from safetensors.torch import load_file

    from lrq_deploy.checkpoint import load_checkpoint
    from lrq_deploy.export.vllm import load_decompressed
    from lrq_deploy.quant import QuantLinear, unpack_codes
    from lrq_deploy.quant.floats import E2M1, decode

    ckpt, out = _export(tmp_path, QuantScheme.preset(preset))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    assert config["config_groups"]["group_0"]["weights"]["type"] == "float"
    tensors = load_file(out / "model.safetensors")
    linears = {n: m for n, m in load_checkpoint(ckpt).model.named_modules() if isinstance(m, QuantLinear)}
    decompressed = load_decompressed(out)
    for name, linear in linears.items():
        assert torch.equal(decompressed.get_submodule(name).weight.float(), linear.dequantized_weight()), name
        if preset == "fp8":
            assert torch.equal(tensors[f"{name}.weight"].float(), linear.qweight.view(torch.float8_e4m3fn).float())
            assert torch.equal(tensors[f"{name}.input_scale"].reshape(1), linear.tensor_scales[1:])
            continue
        assert torch.equal(decode(unpack_codes(tensors[f"{name}.weight_packed"], 4), E2M1),
                           decode(unpack_codes(linear.qweight, 4), E2M1))
        assert torch.equal(tensors[f"{name}.weight_scale"].view(torch.uint8), linear.scales)
        assert tensors[f"{name}.weight_global_scale"].item() * linear.tensor_scales[0].item() == 1.0
        if linear.config.quantize_activations:
            assert tensors[f"{name}.input_global_scale"].item() * linear.input_scale.item() == 1.0


def test_vllm_fp8_kv_cache_is_the_kv_cache_scheme_vllm_reads(tmp_path):
    """An FP8 cache: the config's kv_cache_scheme as llm-compressor writes it (static per-tensor E4M3)
    and each attention layer's calibrated k_scale / v_scale, shape (1,), equal to the checkpoint's; no
    lrq quantizer state left in the file; the directory still loads in transformers."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lrq_deploy.checkpoint import load_checkpoint
    from lrq_deploy.quant.kv_cache import kv_quantizers

    ckpt, out = _export(tmp_path, QuantScheme(wbits=4, group_size=64, symmetric=True, kv_cache="fp8"))
    kv = json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"], kv["symmetric"]) == (8, "float", "tensor", False, True)
    model = load_checkpoint(ckpt).model
    attention = {name.rpartition(".")[0]: q for name, q in model.named_modules() if q in kv_quantizers(model)}
    assert len(attention) == model.config.num_hidden_layers
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "kv_quant" in k]
        for name, quantizer in attention.items():
            for param in ("k_scale", "v_scale"):
                stored = handle.get_tensor(f"{name}.{param}")
                assert stored.shape == (1,) and stored.dtype == torch.float32
                assert torch.equal(stored, getattr(quantizer, param).float().reshape(1))
                assert stored.item() != 1.0
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
