"""`lrq export --genai DIR`: a directory onnxruntime-genai loads and generates with, its greedy
tokens equal to the torch reference's; the MatMulNBits accuracy level written into the graph."""

from __future__ import annotations

import json
import re
from collections import Counter

import onnx
import pytest

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.errors import LrqError
from lrq_deploy.export import ExportOptions
from lrq_deploy.export.genai import GENERATION_TOKENS, export_genai, genai_config
from lrq_deploy.quant.scheme import QuantScheme
from cli_runner import invoke
from hostile import another_native_library


@pytest.fixture(scope="module")
def bundled_w4(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("genai") / "w4g64"
    calibrate("bundled:llama", ckpt, QuantScheme(wbits=4, group_size=64), CalibConfig.of("rtn", nsamples=2, seqlen=32),
              device="cpu")
    return ckpt


def accuracy_levels(graph) -> set[int]:
    nodes = [n for n in onnx.load(str(graph)).graph.node if n.op_type == "MatMulNBits"]
    assert nodes, "no MatMulNBits node in the graph"
    return {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"}


def test_genai_directory_generates_what_torch_generates(bundled_w4, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "genai"
    report = export_genai(bundled_w4, out, ExportOptions(limit=2))
    assert sorted(p.name for p in out.iterdir()) == [
        "genai_config.json", "lrq-export.json", "model.onnx", "model.onnx.verify.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert report["verify"]["within_tolerance"] and report["verify_generation"]["match"]
    generation = report["genai_generation"]
    assert len(generation["torch"]) == GENERATION_TOKENS
    assert generation["onnxruntime_genai"] == generation["torch"]
    assert accuracy_levels(out / "model.onnx") == {1}  # exact activations, as verified
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"]  # one buffer per layer, appended in place
    assert config["model"]["decoder"]["inputs"]["attention_mask"] == "attention_mask"
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["DequantizeLinear"] == 0 and ops["MatMulNBits"] == 4 * 4  # q/k/v, o, gate/up, down in 4 layers


def test_int8_activation_export_writes_accuracy_level_4(bundled_w4, tmp_path):
    out = tmp_path / "genai"
    report = export_genai(bundled_w4, out, ExportOptions(limit=2, ort_int8_activations=True))
    assert accuracy_levels(out / "model.onnx") == {4}
    assert report["verify"]["within_tolerance"]  # checked with the int8-activation tolerance


def test_info_and_bench_take_the_directory_for_its_graph(bundled_w4, tmp_path):
    out = tmp_path / "genai"
    export_genai(bundled_w4, out, ExportOptions(verify=False))
    result = invoke("info", out, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["path"] == str(out / "model.onnx"), result.output
    result = invoke("bench", "--decode", out, "--prompt-len", "8", "--new-tokens", "4", "--iterations", "1")
    assert result.exit_code == 0 and "cache in place" in result.output, result.output
    (out / "lrq-export.json").write_text("{not json")
    result = invoke("info", out)
    assert result.exit_code != 0 and "not a readable export record" in result.output and "Traceback" not in result.output
    (out / "lrq-export.json").write_text(json.dumps({"format": "lrq-genai/1", "graph": "model.onnx"}))
    (out / "model.onnx").unlink()
    result = invoke("bench", out)
    assert result.exit_code != 0 and "without its graph model.onnx" in result.output


def test_opt_runs_in_genai_as_its_generic_decoder(tiny_opt_dir, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    report = export_genai(str(tiny_opt_dir), tmp_path / "opt", ExportOptions(limit=2))
    assert report["genai_generation"]["match"], report["genai_generation"]


def test_phi3_fused_projection_feeds_group_query_attention_in_genai(tmp_path):
    """Phi-3's one qkv_proj hands GroupQueryAttention its packed output (no Split between them)
    and onnxruntime-genai generates torch's tokens with the cache in place."""
    pytest.importorskip("onnxruntime_genai")
    from conftest import _save_hf
    from lrq_deploy.models.tiny import tiny_model

    path = _save_hf(tiny_model("phi3"), tmp_path / "phi3")
    report = export_genai(str(path), tmp_path / "genai", ExportOptions(limit=2))
    assert report["attention"] == "GroupQueryAttention" and report["kv_cache_in_place"]
    assert report["genai_generation"]["match"], report["genai_generation"]
    nodes = onnx.load(str(tmp_path / "genai" / "model.onnx")).graph.node
    assert all(n.input[1] == n.input[2] == "" for n in nodes if n.op_type == "GroupQueryAttention")


def test_config_describes_the_graph(tiny_llama_dir, tiny_opt_dir):
    from lrq_deploy.checkpoint import load_source

    llama = genai_config(load_source(str(tiny_llama_dir)).loaded, in_place=True)["model"]
    decoder = llama["decoder"]
    assert llama["type"] == "llama" and llama["vocab_size"] == 2048 and llama["context_length"] == 256
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"],
            decoder["num_hidden_layers"], decoder["hidden_size"]) == (4, 2, 16, 2, 64)
    assert decoder["inputs"]["past_key_names"] == "past.%d.key"
    assert decoder["inputs"]["attention_mask"] == "attention_mask"
    opt = genai_config(load_source(str(tiny_opt_dir)).loaded, in_place=False)
    assert opt["model"]["type"] == "decoder"  # not a genai type
    assert "attention_mask" not in opt["model"]["decoder"]["inputs"] and not opt["search"]["past_present_share_buffer"]


def test_fp_model_and_opt_export_without_genai_installed(tiny_opt_dir, tmp_path, monkeypatch):
    """Without onnxruntime-genai the directory is still written (the graph verified by onnxruntime),
    and the report says the generation check did not run."""
    import builtins

    real_import = builtins.__import__

    def no_genai(name, *args, **kwargs):
        if name == "onnxruntime_genai":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    report = export_genai(str(tiny_opt_dir), tmp_path / "opt", ExportOptions(limit=2))
    assert report["genai_generation"] is None and report["verify"]["within_tolerance"]
    assert json.loads((tmp_path / "opt" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 2


@pytest.mark.parametrize("args, message", [
    (["--target", "trt"], "drop --target trt"),
    (["--batch", "1"], "dynamic batch and sequence axes"),
    (["--onnx", "x.onnx"], "name one output"),
])
def test_bad_genai_options(bundled_w4, tmp_path, args, message):
    result = invoke("export", bundled_w4, "--genai", tmp_path / "g", *args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "g").exists()


def test_genai_refuses_a_vision_model_and_foreign_directories(tmp_path):
    with pytest.raises(LrqError, match="decoder-only language models"):
        export_genai("bundled:vit", tmp_path / "vit", ExportOptions(verify=False))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LrqError, match="not an lrq onnxruntime-genai export"):
        export_genai("bundled:llama", foreign, ExportOptions(verify=False, force=True))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cpu_kernel_directory_carries_its_library_and_generates_what_torch_generates(bundled_w4, tmp_path):
    from lrq_deploy.export.genai import KERNEL_LIBRARY
    from lrq_deploy.runtime.cpu_kernels import DOMAIN, OP

    out = tmp_path / "genai"
    report = export_genai(bundled_w4, out, ExportOptions(limit=2, cpu_kernels=True))
    assert report["cpu_kernel_linears"] == 4 * 4 and report["verify"]["within_tolerance"]
    assert report["verify_generation"]["match"]
    ops = Counter((n.domain, n.op_type) for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops[(DOMAIN, OP)] == 16 and ops[("com.microsoft", "MatMulNBits")] == 0
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == KERNEL_LIBRARY
    assert (out / KERNEL_LIBRARY).is_file()
    if report["genai_generation"] is not None:  # onnxruntime-genai installed: it loaded the library itself
        assert report["genai_generation"]["onnxruntime_genai"] == report["genai_generation"]["torch"]


def _flip_bytes(path):
    code = bytearray(path.read_bytes())
    code[len(code) // 2] ^= 0xFF
    path.write_bytes(bytes(code))


def _replace_by_another_library(path):
    import shutil

    shutil.copyfile(another_native_library(), path)


DAMAGES = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:4096]), "bytes flipped": _flip_bytes,
           "another library": _replace_by_another_library, "deleted": lambda p: p.unlink()}


@pytest.fixture(scope="module")
def cpu_kernel_directory(bundled_w4, tmp_path_factory):
    out = tmp_path_factory.mktemp("genai-ck") / "genai"
    export_genai(bundled_w4, out, ExportOptions(verify=False, cpu_kernels=True))
    return out


def test_cpu_kernel_directory_records_its_native_code(cpu_kernel_directory):
    from lrq_deploy.export.genai import KERNEL_LIBRARY
    from lrq_deploy.provenance import sha256_of

    recorded = json.loads((cpu_kernel_directory / "lrq-export.json").read_text())["native_code"][KERNEL_LIBRARY]
    assert recorded["sha256"] == sha256_of(cpu_kernel_directory / KERNEL_LIBRARY) and recorded["machine"]
    result = invoke("info", cpu_kernel_directory)
    assert result.exit_code == 0, result.output
    assert re.search(rf"native code\s+{KERNEL_LIBRARY}\s.*sha256 {recorded['sha256']}\s+intact", result.output)
    assert "intact" in result.output and "loaded by onnxruntime-genai" in result.output


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_changed_native_library_is_reported_and_refused(cpu_kernel_directory, tmp_path, damage):
    import shutil

    from lrq_deploy.export.genai import KERNEL_LIBRARY

    copy = tmp_path / "genai"
    shutil.copytree(cpu_kernel_directory, copy)
    DAMAGES[damage](copy / KERNEL_LIBRARY)
    info = invoke("info", copy)
    assert info.exit_code == 1 and "NOT intact" in info.output, info.output
    assert f"error: {copy} is not intact: native library {KERNEL_LIBRARY} is" in info.output
    bench = invoke("bench", "--decode", copy, "--prompt-len", "4", "--new-tokens", "2", "--iterations", "1")
    assert bench.exit_code == 1 and bench.output.strip().splitlines()[-1].startswith(f"error: {copy}: native library")


def test_unrecorded_native_code_is_reported(cpu_kernel_directory, tmp_path):
    import shutil

    copy = tmp_path / "genai"
    shutil.copytree(cpu_kernel_directory, copy)
    _replace_by_another_library(copy / "libextra.so")
    info = invoke("info", copy)
    assert info.exit_code == 1 and "libextra.so is native code the export did not record" in info.output


def test_cpu_kernels_refuse_other_targets_and_float_weights(bundled_w4, tmp_path):
    with pytest.raises(LrqError, match="--target ort"):
        ExportOptions(cpu_kernels=True, target="trt")
    with pytest.raises(LrqError, match="Triton model repository does not carry"):
        ExportOptions(cpu_kernels=True, triton_repo=tmp_path / "triton")
    result = invoke("export", "bundled:llama", "--onnx", tmp_path / "fp.onnx", "--cpu-kernels", "--no-verify")
    assert result.exit_code != 0 and "no linear of this graph fits lrq's CPU kernel" in result.output
    assert not (tmp_path / "fp.onnx").exists()
