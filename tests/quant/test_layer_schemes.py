"""Per-layer schemes (--scheme-for, --recipe): rule parsing and matching, calibration under mixed
schemes with every method family, the checkpoint's record, reload and every export target."""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import invoke as lrq
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.errors import LrqError
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.layer_schemes import LayerSchemes, SchemeRule, load_recipe, parse_rule, parse_scheme
from lrq_deploy.quant.scheme import QuantScheme

FAST = ["--nsamples", "4", "--seq-len", "32"]
W3 = QuantScheme(wbits=3)


def test_scheme_names_presets_fields_and_none():
    assert parse_scheme("w4a16-g128", W3) == QuantScheme(wbits=4, group_size=128)
    assert parse_scheme("W4A8-sym", W3) == QuantScheme(wbits=4, abits=8, symmetric=True)
    assert parse_scheme("w4a8-act-sym", W3) == QuantScheme(wbits=4, abits=8, act_asym=False)
    assert parse_scheme("w4a8", W3).act_asym  # per-token activations asymmetric by default, as on the command line
    assert parse_scheme("nvfp4", W3) == QuantScheme.preset("nvfp4")
    assert parse_scheme("none", W3) is None
    assert parse_scheme({"wbits": 4}, QuantScheme(wbits=3, group_size=64)) == QuantScheme(wbits=4, group_size=64)
    for bad in ("w5a16", "int4", "w4a16-g7", {"bits": 4}):
        with pytest.raises(LrqError):
            parse_scheme(bad, W3)


def test_rules_match_full_names_last_components_and_rotated_linears():
    rule = SchemeRule("down_proj", None)
    assert rule.matches("model.layers.3.mlp.down_proj")
    assert rule.matches("model.layers.3.mlp.down_proj.linear")  # behind an online rotation
    assert not rule.matches("model.layers.3.mlp.down_projection")
    assert SchemeRule("model.layers.1.*", None).matches("model.layers.1.self_attn.q_proj")
    assert SchemeRule("mlp.*", None).matches("model.layers.0.mlp.up_proj")
    schemes = LayerSchemes(W3, (parse_rule("lm_head=w4a16-g64", W3), parse_rule("*_proj=w4a16", W3)))
    assert schemes.for_module("lm_head") == QuantScheme(wbits=4, group_size=64)
    assert schemes.for_module("model.layers.0.mlp.up_proj") == QuantScheme(wbits=4)
    assert schemes.for_module("model.layers.0.mlp.other") == W3
    assert LayerSchemes.from_dict(W3, schemes.to_dict()) == schemes
    with pytest.raises(LrqError, match="matches no quantizable module"):
        LayerSchemes(W3, (SchemeRule("donw_proj", None),)).check_matches(["model.layers.0.mlp.down_proj"])
    with pytest.raises(LrqError, match="PATTERN=SCHEME"):
        parse_rule("lm_head", W3)


def test_recipe_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: w3a16-g64\nlayers:\n  lm_head: w4a16-g128\n  down_proj: {wbits: 4}\n"
                      "  model.layers.0.*: none\n")
    schemes = load_recipe(recipe, QuantScheme())
    assert schemes.default == QuantScheme(wbits=3, group_size=64)
    assert [r.pattern for r in schemes.rules] == ["lm_head", "down_proj", "model.layers.0.*"]
    assert schemes.rules[1].scheme == QuantScheme(wbits=4, group_size=64)  # fields over the recipe's default
    assert schemes.rules[2].scheme is None
    for text, message in (("layers: [a, b]", "expected a mapping"), ("layers: {a: w9a16}", "a: wbits must be one of"),
                          ("{unclosed", "not a readable YAML"), ("default: none", "cannot be none")):
        recipe.write_text(text)
        with pytest.raises(LrqError, match=message):
            load_recipe(recipe, QuantScheme())
    with pytest.raises(LrqError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml", QuantScheme())


def _schemes_of(model) -> dict[str, str]:
    return {name: m.config.name for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "lrquant"])
def test_mixed_schemes_calibrate_record_reload(tiny_llama_dir, tmp_path, method):
    out = tmp_path / "ckpt"
    extra = ["--epochs", "1"] if method == "lrquant" else []
    result = lrq("calibrate", tiny_llama_dir, "-o", out, "--wbits", "3", "--method", method, *FAST, *extra,
                 "--scheme-for", "lm_head=w4a16-g64", "--scheme-for", "down_proj=w4a16-g32",
                 "--scheme-for", "model.layers.0.self_attn.o_proj=none")
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    schemes = _schemes_of(ckpt.model)
    assert schemes["lm_head"] == "W4A16-g64"  # a rule naming the head quantizes it
    assert schemes["model.layers.1.mlp.down_proj"] == "W4A16-g32"
    assert schemes["model.layers.1.self_attn.q_proj"] == "W3A16"
    assert "model.layers.0.self_attn.o_proj" not in schemes  # kept in floating point
    assert isinstance(ckpt.model.get_submodule("model.layers.0.self_attn.o_proj"), torch.nn.Linear)
    assert ckpt.scheme_name == "W3A16 + W4A16-g32 + W4A16-g64"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["pattern"] for r in manifest["layer_schemes"]["rules"]] == [
        "lm_head", "down_proj", "model.layers.0.self_attn.o_proj"]
    down = ckpt.model.get_submodule("model.layers.0.mlp.down_proj")
    assert down.scales.shape[1] == down.in_features // 32  # stored in its own group layout
    info = lrq("info", out)
    assert "W3A16 x11, W4A16-g32 x2, W4A16-g64 x1" in info.output


def test_mixed_activation_bits_share_no_quantizer(tiny_llama_dir, tmp_path):
    """W4A4 blocks with 8-bit activations into down_proj: each linear quantizes its input its own way,
    in calibration (learnable method), the checkpoint and the onnxruntime graph."""
    out = tmp_path / "ckpt"
    result = lrq("calibrate", tiny_llama_dir, "-o", out, "--wbits", "4", "--abits", "4", "--method", "lrquant+",
                 "--epochs", "1", *FAST, "--scheme-for", "down_proj=w4a8")
    assert result.exit_code == 0, result.output
    schemes = _schemes_of(load_checkpoint(out).model)
    assert schemes["model.layers.0.mlp.down_proj"] == "W4A8-asym"
    assert schemes["model.layers.0.mlp.up_proj"] == "W4A4-asym"
    graph = lrq("export", out, "--onnx", tmp_path / "m.onnx", "--limit", "2")
    assert graph.exit_code == 0 and "within tolerance" in graph.output, graph.output


def test_mixed_checkpoint_exports_everywhere(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    assert lrq("calibrate", tiny_llama_dir, "-o", out, "--wbits", "4", "--group-size", "32", *FAST,
               "--scheme-for", "lm_head=w4a16-g64", "--scheme-for", "mlp.*=w8a16").exit_code == 0
    for args in (["--onnx", tmp_path / "ort.onnx"], ["--onnx", tmp_path / "trt.onnx", "--target", "trt"],
                 ["--onnx", tmp_path / "cpu.onnx", "--cpu-kernels", "--with-past"]):
        result = lrq("export", out, *args, "--limit", "2")
        assert result.exit_code == 0 and "within tolerance" in result.output, result.output
    pytest.importorskip("compressed_tensors")
    from lrq_deploy.export.vllm import decompressed_weights

    result = lrq("export", out, "--vllm", tmp_path / "vllm")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 3
    ckpt = load_checkpoint(out)
    names = [n for n, m in ckpt.model.named_modules() if isinstance(m, QuantLinear)]
    for name, weight in decompressed_weights(tmp_path / "vllm", names).items():
        assert torch.equal(weight, ckpt.model.get_submodule(name).dequantized_weight().float()), name


def test_bad_rules_are_refused_before_work(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--scheme-for", "donw_proj=w4a16")
    assert result.exit_code != 0 and "matches no quantizable module" in result.output
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--scheme-for", "down_proj=int4")
    assert result.exit_code != 0 and "unknown scheme" in result.output
    result = lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--scheme-for", "down_proj=w4a16-g48")
    assert result.exit_code != 0 and "does not divide" in result.output
    assert not out.exists()
    assert lrq("calibrate", tiny_llama_dir, "-o", out, *FAST, "--scheme-for", "q_proj=w8a16").exit_code == 0
    result = lrq("export", out, "--vllm", tmp_path / "vllm")
    assert result.exit_code != 0 and "as one layer (qkv_proj)" in result.output
    assert not (tmp_path / "vllm").exists()
