"""Rotations (lrq_deploy/rotate.py): the Hadamard factors are orthogonal, the online transform equals
its dense matrix, a rotated full-precision model computes the original function, and a rotated
W4A4 checkpoint reloads bit-exactly, exports and verifies in onnxruntime."""

import json

import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.errors import LrqError
from lrq_deploy.models import LoadedModel, load_model
from lrq_deploy.models.registry import hf_adapter
from lrq_deploy.models.tiny import COMMON, TINY, tiny_model
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.rotate import (
    OnlineRotation, apply_factors, hadamard_factors, kron_all, plan_rotation, rotate_model,
)

W4A4 = QuantScheme(wbits=4, abits=4, act_asym=True)


@pytest.mark.parametrize("n", [12, 20, 28, 44, 60, 64, 192, 512, 688, 1536, 3584])
def test_factors_are_orthogonal_and_the_transform_is_their_kronecker_product(n):
    factors = hadamard_factors(n, torch.Generator().manual_seed(0))
    dense = kron_all(factors)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(apply_factors(x, factors), x @ dense, atol=1e-12)


@pytest.mark.parametrize("n,hadamard", [(192, True), (512, True), (3584, True), (688, False), (11008, False)])
def test_known_hadamard_orders_have_entries_of_one_magnitude(n, hadamard):
    """Sylvester and Paley orders give a true Hadamard matrix; an odd part with none known (43 in
    688 = 16 x 43 and in 11008 = 256 x 43) gets a random orthogonal factor."""
    factors = hadamard_factors(n, torch.Generator().manual_seed(0))
    flat = all(torch.allclose(f.abs() * f.shape[0] ** 0.5, torch.ones_like(f)) for f in factors)
    assert flat == hadamard
    assert max(f.shape[0] for f in factors) <= 64


def test_no_known_hadamard_size_without_a_generator_is_refused():
    with pytest.raises(LrqError, match="no Hadamard matrix"):
        hadamard_factors(688)


OTHER_CONFIGS = {  # rotatable families beyond models/tiny.py's, with norm weights and biases made non-trivial
    "llama": ("LlamaConfig", COMMON), "mistral": ("MistralConfig", COMMON),
    "qwen2": ("Qwen2Config", {**COMMON, "tie_word_embeddings": True}),
    "opt": ("OPTConfig", dict(vocab_size=2048, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=256)),
}


def _tiny(model_type: str):
    import transformers

    if model_type in TINY:
        model = tiny_model(model_type)
    else:
        name, settings = OTHER_CONFIGS[model_type]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**settings)).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.add_(torch.rand_like(param) * 0.5)
    adapter = hf_adapter(model.config.model_type)
    adapter.restructure(model)
    return LoadedModel(model=model, adapter=adapter, tokenizer=None, spec=model_type)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "mixtral", "qwen3_moe",
                                        "opt"])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotated_model_computes_the_original_function(model_type, kind):
    loaded = _tiny(model_type)
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        record = rotate_model(loaded, plan_rotation(loaded, kind, seed=3))
        got = loaded.model(input_ids=ids).logits
    # float32 weights rotated in float64 and rounded once: errors of a few float32 ulps of the logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    block = loaded.adapter.blocks(loaded.model)[0]
    layout = loaded.adapter.rotation_layout(loaded.model)
    assert set(record["online"]) == set(layout.online) and all(
        isinstance(block.get_submodule(name), OnlineRotation) for name in layout.online)
    for group in loaded.adapter.smooth_groups(loaded.model):
        if group.prev_kind == "norm":
            assert torch.equal(block.get_submodule(group.prev).weight + layout.norm_offset, torch.ones(64))
    embeddings, head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
    assert embeddings.weight.data_ptr() != head.weight.data_ptr() and not loaded.model.config.tie_word_embeddings


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotated_vit_computes_the_original_function(kind):
    """Pre-LN ViT: patch embedding, class token and positions centred and rotated, LayerNorms turned
    CentredNorms, fc2 rotated online (width 256 = 64 x 4)."""
    loaded = load_model("bundled:vit", "cpu")
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(images)
        record = rotate_model(loaded, plan_rotation(loaded, kind, seed=1))
        got = loaded.model(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert record["online"] == {"mlp.fc2": [64, 4]} and record["centred_norms"]["blocks"] == ["norm1", "norm2"]


def test_families_that_cannot_be_rotated_are_refused_in_one_line(tiny_bert_dir):
    loaded = load_model(str(tiny_bert_dir), "cpu")
    with pytest.raises(LrqError, match="a bert model cannot be rotated exactly"):
        plan_rotation(loaded, "hadamard", 0)
    post_ln = _tiny("opt")
    post_ln.model.config.do_layer_norm_before = False  # OPT-350m's layout: the residual itself normalised
    with pytest.raises(LrqError, match="a opt model cannot be rotated exactly"):
        plan_rotation(post_ln, "hadamard", 0)
    with pytest.raises(LrqError, match="a gemma model cannot be rotated exactly"):  # Gemma 2's post-norms
        plan_rotation(_tiny("gemma2"), "hadamard", 0)
    with pytest.raises(LrqError, match="--rotate must be one of"):
        CalibConfig.of("rtn", rotate="spin")


@pytest.fixture(scope="module")
def rotated_checkpoint(tmp_path_factory):
    """bundled:llama (hidden 192 = 12 x 16, a Paley factor) rotated, rtn W4A4; the in-memory model kept."""
    from lrq_deploy.calib import blockwise

    out = tmp_path_factory.mktemp("rot") / "ckpt"
    kept = {}
    original = blockwise.calibrate_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lrq_deploy.calib.api.calibrate_model", lambda *a, **k: kept.setdefault("result", original(*a, **k)))
        calibrate("bundled:llama", out, W4A4, CalibConfig.of("rtn", nsamples=4, seqlen=64, rotate="hadamard"),
                  device="cpu")
    return out, kept["result"].model


def test_rotated_checkpoint_reloads_bit_exactly(rotated_checkpoint):
    out, calibrated = rotated_checkpoint
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rotation"]["online"] == {"mlp.down_proj": [64, 8]} and manifest["calib"]["rotate"] == "hadamard"
    assert "model.layers.0.mlp.down_proj.linear" in manifest["quantized_modules"]
    model = load_checkpoint(out).loaded.model
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, calibrated(input_ids=ids).logits)


def test_rotated_checkpoint_exports_and_verifies_in_onnxruntime(rotated_checkpoint, tmp_path):
    import onnx

    from lrq_deploy.export.onnx_export import export_onnx

    out, _ = rotated_checkpoint
    report = export_onnx(out, tmp_path / "rot.onnx", limit=4)
    assert report["verify"]["within_tolerance"]
    model = onnx.load(str(tmp_path / "rot.onnx"), load_external_data=False)
    assert sum(node.op_type == "MatMul" for node in model.graph.node) >= 2 * 4  # two factors before each down_proj
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["lrq.rotation"]) == {"kind": "hadamard", "seed": 0, "online": {"mlp.down_proj": [64, 8]}}


def test_a_manifest_whose_transform_does_not_fit_is_refused(rotated_checkpoint, tmp_path):
    import shutil

    from lrq_deploy.checkpoint import manifest_digest, SELF_HASH

    out, _ = rotated_checkpoint
    copy = tmp_path / "bad"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["rotation"]["online"]["mlp.down_proj"] = [64, 4]
    manifest[SELF_HASH] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LrqError, match=r"online transform of mlp.down_proj \(\[64, 4\]\) does not match its 512"):
        load_checkpoint(copy)


def test_rotated_checkpoint_decodes_with_the_kv_cache_graph(rotated_checkpoint, tmp_path):
    from lrq_deploy.export.onnx_export import export_onnx

    out, _ = rotated_checkpoint
    report = export_onnx(out, tmp_path / "past.onnx", limit=2, with_past=True)
    assert report["verify"]["within_tolerance"] and report["verify_generation"]["match"]


def test_calibration_records_where_rotation_pays(rotated_checkpoint, tmp_path):
    """Per linear input, the channel and token max / median ratios: the rotated down_proj input is
    flatter than the unrotated one on the same windows."""
    from lrq_deploy.info import describe

    out, _ = rotated_checkpoint
    plain = tmp_path / "plain"
    calibrate("bundled:llama", plain, W4A4, CalibConfig.of("rtn", nsamples=4, seqlen=64), device="cpu")
    rotated = json.loads((out / "manifest.json").read_text())["blocks"]
    unrotated = json.loads((plain / "manifest.json").read_text())["blocks"]
    for before, after in zip(unrotated, rotated):
        assert after["input_ratios"]["mlp.down_proj.linear"]["channel"] < before["input_ratios"]["mlp.down_proj"]["channel"]
        assert after["input_ratios"]["mlp.down_proj.linear"]["token"] < before["input_ratios"]["mlp.down_proj"]["token"]
    assert "mlp.down_proj" in describe(plain)["largest_input_ratios"]


def test_learned_transforms_leave_the_full_precision_block_unchanged():
    """Any invertible mixes A_i: factors F_i A_i and weight W A^-T compute the block's function."""
    from torch.func import functional_call

    from lrq_deploy.calib.learnable import BlockParams, transformed_block_params

    loaded = _tiny("llama")
    rotate_model(loaded, plan_rotation(loaded, "hadamard", seed=0))
    block = loaded.adapter.blocks(loaded.model)[0]
    params = BlockParams()
    gen = torch.Generator().manual_seed(0)
    for i, size in enumerate(block.mlp.down_proj.transform.sizes):
        params.add("mix", f"mlp.down_proj.{i}", torch.eye(size) + 0.2 * torch.randn(size, size, generator=gen))
    job = type("Job", (), {"block": block})()
    x = torch.randn(2, 7, 64, generator=gen)
    with torch.no_grad():
        expected = block.mlp(x)
        got = functional_call(block.mlp, {k.removeprefix("mlp."): v for k, v in
                                          transformed_block_params(job, params, {}).items()}, (x,))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_learned_transforms_are_folded_into_the_checkpoint_and_export(tmp_path, tiny_llama_dir):
    from lrq_deploy.export.onnx_export import export_onnx

    out = tmp_path / "lt"
    calibrate(str(tiny_llama_dir), out, W4A4, CalibConfig.of("lrquant+", nsamples=2, seqlen=32, epochs=2,
                                                             rotate="hadamard", learn_transforms=True), device="cpu")
    from safetensors.torch import load_file

    loaded = load_checkpoint(out).loaded
    for index, block in enumerate(loaded.adapter.blocks(loaded.model)):
        learned = load_file(out.parent / "lt.run" / f"block_{index:03d}.safetensors")
        mixes = [learned[f"mix__mlp_down_proj_{i}"] for i in range(2)]
        expected = [h.float() @ m for h, m in zip(hadamard_factors(128), mixes)]
        assert all(torch.equal(a, b) for a, b in zip(block.mlp.down_proj.transform.factors(), expected))
    report = export_onnx(out, tmp_path / "lt.onnx", limit=2)
    assert report["verify"]["within_tolerance"]


def test_online_transform_graph_equals_the_torch_reference(tmp_path):
    """The transform as torch.onnx writes it (Reshape, MatMul, Transpose per factor) in onnxruntime:
    float32 within accumulation-order rounding of torch's result."""
    import onnxruntime as ort

    from lrq_deploy.rotate import online_transform

    factors = hadamard_factors(688, torch.Generator().manual_seed(0))  # a random 43 and a Sylvester 16
    transform = online_transform(factors).eval()
    x = torch.randn(2, 5, 688, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "t.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(transform, (x,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_shapes=({0: batch},), dynamo=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = transform(x).numpy()
    assert abs(got - expected).max() < 1e-5 and abs(expected - (x.double() @ kron_all(factors)).numpy()).max() < 1e-5


def test_rotated_genai_directory_with_the_cpu_kernel_generates_what_torch_generates(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from lrq_deploy.export import ExportOptions
    from lrq_deploy.export.genai import export_genai

    ckpt = tmp_path / "w4"
    calibrate("bundled:llama", ckpt, QuantScheme(wbits=4, group_size=32, symmetric=True),
              CalibConfig.of("rtn", nsamples=2, seqlen=32, rotate="hadamard"), device="cpu")
    report = export_genai(ckpt, tmp_path / "genai", ExportOptions(limit=2, cpu_kernels=True))
    assert report["verify"]["within_tolerance"] and report["verify_generation"]["match"]
    assert report["genai_generation"]["onnxruntime_genai"] == report["genai_generation"]["torch"]


def test_rotated_opt_checkpoint_reloads_bit_exactly_and_exports(tiny_opt_dir, tmp_path):
    """LayerNorm (pre-LN OPT): the stream centred, each norm a CentredNorm with its rotated bias, fc2
    rotated online; the checkpoint rebuilds those modules and its KV-cache graph verifies."""
    from lrq_deploy.calib import blockwise
    from lrq_deploy.export.onnx_export import export_onnx
    from lrq_deploy.rotate import CentredNorm

    out, kept = tmp_path / "opt", {}
    original = blockwise.calibrate_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lrq_deploy.calib.api.calibrate_model", lambda *a, **k: kept.setdefault("result", original(*a, **k)))
        calibrate(str(tiny_opt_dir), out, W4A4, CalibConfig.of("smoothquant", nsamples=2, seqlen=32, rotate="hadamard"),
                  device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rotation"]["centred_norms"] == {
        "model": ["model.decoder.final_layer_norm"], "blocks": ["final_layer_norm", "self_attn_layer_norm"]}
    model = load_checkpoint(out).loaded.model
    assert isinstance(model.model.decoder.final_layer_norm, CentredNorm)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, kept["result"].model(input_ids=ids).logits)
    report = export_onnx(out, tmp_path / "opt.onnx", limit=2, with_past=True)
    assert report["verify"]["within_tolerance"] and report["verify_generation"]["match"]
