"""Bad input across every command, through the real CLI.

Each case builds its inputs in a fresh directory, runs `lrq ...`, and must end with a non-zero
exit, exactly one output line naming the problem (no traceback), and the directory exactly as
it was before (nothing written that could look valid, nothing of the user's removed).
docs/BAD_INPUTS.md lists every case with the message it gives (scripts/bad_inputs_doc.py).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from hostile import PicklePayload, another_native_library, read_only_directory

from lrq_deploy.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "BAD_INPUTS.md"


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable  # (Inputs) -> list of CLI arguments
    message: str  # a fragment of the one error line
    needs: str | None = None  # "trt": a TensorRT flavour installed; "no-cuda": a machine without CUDA
    report: bool = False  # the command prints its report on stdout before the error (lrq info)
    env: Callable | None = None  # (Inputs) -> environment variables the case sets


class Inputs:
    """The case's directory and builders of the inputs it needs (copies of shared artifacts)."""

    def __init__(self, root: Path, shared: dict):
        self.root = root
        self.shared = shared

    def path(self, name: str) -> str:
        return str(self.root / name)

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def model(self, name: str = "model") -> Path:
        """A copy of the tiny random LLaMA HF directory."""
        return Path(shutil.copytree(self.shared["llama"], self.root / name))

    def checkpoint(self, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(self.shared["checkpoint"], self.root / name))

    def onnx(self, name: str = "model.onnx") -> str:
        return str(shutil.copy(self.shared["onnx"], self.root / name))

    def read_only_dir(self, name: str = "ro") -> str:
        return read_only_directory(self.root / name)


# --- builders of damaged inputs -------------------------------------------------------------------

def _config(inputs: Inputs, config: dict | str) -> str:
    model = inputs.model()
    (model / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(model)


def _llama_config(inputs: Inputs) -> dict:
    return json.loads((inputs.shared["llama"] / "config.json").read_text())


def _poisoned_weights(inputs: Inputs, value: float) -> str:
    from safetensors.torch import load_file, save_file

    model = inputs.model()
    state = load_file(str(model / "model.safetensors"))
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name][0, 0] = value
    save_file(state, str(model / "model.safetensors"))
    return str(model)


def _pickle_only_model(inputs: Inputs) -> str:
    model = inputs.model()
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(PicklePayload(inputs.root / "PWNED")))
    return str(model)


def _truncated_hf_weights(inputs: Inputs) -> str:
    model = inputs.model()
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    return str(model)


def _edited_weights(inputs: Inputs, edit: Callable[[dict], None]) -> str:
    from safetensors.torch import load_file, save_file

    model = inputs.model()
    state = load_file(str(model / "model.safetensors"))
    edit(state)
    save_file(state, str(model / "model.safetensors"))
    return str(model)


def _integer_weight(state: dict) -> None:
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name].mul(100).to(torch.int8)


def _timm_int_weights(inputs: Inputs) -> str:
    return _tiny_vit(inputs, int_head=True)


def _tiny_vit(inputs: Inputs, int_head: bool = False) -> str:
    import timm
    from safetensors.torch import save_file

    directory = inputs.root / "vit"
    directory.mkdir()
    spec = {"model_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 8, "patch_size": 4, "in_chans": 1,
                                                             "num_classes": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}}
    (directory / "timm.json").write_text(json.dumps(spec))
    state = {k: v.contiguous() for k, v in timm.create_model(spec["model_name"], **spec["kwargs"]).state_dict().items()}
    if int_head:
        state["head.weight"] = state["head.weight"].mul(100).to(torch.int8)
    save_file(state, str(directory / "model.safetensors"))
    return str(directory)


def _damaged_header(inputs: Inputs, head: bytes) -> str:
    model = inputs.model()
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(head + data[len(head):])
    return str(model)


def _index_naming_a_missing_shard(inputs: Inputs) -> str:
    model = inputs.model()
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(model)


def _without_files(inputs: Inputs, *names: str) -> str:
    model = inputs.model()
    for name in names:
        (model / name).unlink(missing_ok=True)
    return str(model)


def _fifo(inputs: Inputs) -> str:
    path = inputs.root / "calib.fifo"
    os.mkfifo(path)
    return str(path)


def _onnx_named_engine(inputs: Inputs) -> str:
    return str(shutil.copy(inputs.shared["onnx"], inputs.root / "model.engine"))


def _timm_with(inputs: Inputs, kwargs: dict, model_name: str = "vit_tiny_patch16_224") -> str:
    directory = inputs.root / "vit"
    directory.mkdir()
    (directory / "timm.json").write_text(json.dumps({"model_name": model_name, "kwargs": kwargs}))
    (directory / "model.safetensors").write_bytes(b"")
    return str(directory)


def _run_dir(inputs: Inputs, run_json: str | None = None, report: str | None = None) -> list[str]:
    """An interrupted lrquant run's directory (OUT.run) with the given run.json (and report.json) text."""
    run = inputs.root / "q.run"
    run.mkdir()
    settings = {"model": str(inputs.shared["llama"]), "quant": {"wbits": 4, "abits": 4, "group_size": None, "symmetric": False},
                "calib": {"method": "lrquant", "nsamples": 2, "seqlen": 16, "seed": 0, "batch_size": 1,
                          "options": {"epochs": 1, "lr_smooth": 5e-3, "lr_lwc": 1e-2, "compile": False}},
                "calib_data": None}
    (run / "run.json").write_text(run_json if run_json is not None else json.dumps(settings))
    if report is not None:
        (run / "report.json").write_text(report)
    return ["calibrate", inputs.shared["llama"], "-o", inputs.path("q"), "--method", "lrquant", "--wbits", "4", "--abits", "4",
            "--nsamples", "2", "--seq-len", "16", "--epochs", "1"]


def _damaged(inputs: Inputs, damage: Callable[[Path], None]) -> str:
    ckpt = inputs.checkpoint()
    damage(ckpt)
    return str(ckpt)


def _flip_byte(ckpt: Path) -> None:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(data))


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-64])


def _edit_manifest(edit: Callable[[dict], None], resign: bool = True) -> Callable[[Path], None]:
    """Change the manifest; resign: record the digest of the edited fields, as a writer would (the
    case then reaches the check behind the digest), else leave the old one (a hand edit)."""
    from lrq_deploy.checkpoint import SELF_HASH, manifest_digest

    def damage(ckpt: Path) -> None:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        edit(manifest)
        if resign:
            manifest[SELF_HASH] = manifest_digest(manifest)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _drop_tensor(ckpt: Path) -> None:
    """A checkpoint missing one tensor, with hashes that match (re-recorded after the edit)."""
    from safetensors.torch import load_file, save_file

    from lrq_deploy.checkpoint import file_records

    state = load_file(str(ckpt / "model.safetensors"))
    state.pop(next(k for k in state if k.endswith("scales")))
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "lrq-checkpoint"})
    _edit_manifest(lambda m: m.update(files=file_records(ckpt)))(ckpt)


def _foreign_onnx(inputs: Inputs) -> str:
    """A valid graph from another tool: one float MatMul, no quantized weights, no lrq metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path = inputs.root / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _engine_with_record(inputs: Inputs, **changes) -> str:
    """Bytes standing in for an engine, with a build record (as lrq build-engine writes it)."""
    from lrq_deploy.runtime.flavours import load_flavour
    from lrq_deploy.runtime.engine_record import ENGINE_RECORD
    from lrq_deploy.provenance import sha256_of

    flavour = load_flavour()
    engine = Path(inputs.file("m.engine", b"serialized engine bytes"))
    record = {"format": ENGINE_RECORD, "flavour": flavour.name, "tensorrt_version": flavour.version,
              "compute_capabilities": ["89"], "bytes": engine.stat().st_size, "sha256": sha256_of(engine), **changes}
    inputs.file("m.engine.json", json.dumps(record))
    return str(engine)


def _tampered_engine(inputs: Inputs) -> str:
    engine = _engine_with_record(inputs)
    Path(engine).write_bytes(b"serialized engine bytez")
    return engine


# --- the table ------------------------------------------------------------------------------------

FAST = ["--nsamples", "2", "--seq-len", "16"]

def _genai_directory(inputs: Inputs, damage: Callable[[Path], None] | None = None, extra: str | None = None) -> str:
    """An export directory as --genai --cpu-kernels writes it (record, graph, native library), then damaged."""
    from lrq_deploy.provenance import sha256_of

    directory = inputs.root / "genai"
    directory.mkdir()
    shutil.copy(inputs.shared["onnx"], directory / "model.onnx")
    library = directory / "libai_lrq_cpu.so"
    shutil.copyfile(another_native_library(), library)
    record = {"format": "lrq-genai/1", "graph": "model.onnx",
              "native_code": {library.name: {"sha256": sha256_of(library), "bytes": library.stat().st_size}}}
    (directory / "lrq-export.json").write_text(json.dumps(record))
    if damage is not None:
        damage(library)
    if extra is not None:
        shutil.copyfile(another_native_library(), directory / extra)
    return str(directory)


def _tiny_family(inputs: Inputs, model_type: str) -> str:
    from conftest import _save_hf

    from lrq_deploy.models.tiny import tiny_model

    return str(_save_hf(tiny_model(model_type), inputs.root / model_type))


def _q_proj_w8_checkpoint(inputs: Inputs) -> str:
    out = inputs.path("q8")
    result = CliRunner().invoke(main, ["-q", "calibrate", str(inputs.shared["llama"]), "-o", out,
                                       "--scheme-for", "q_proj=w8a16", *FAST])
    assert result.exit_code == 0, result.output
    return out


def _kv_checkpoint(inputs: Inputs, fmt: str) -> str:
    out = inputs.path(f"kv-{fmt}")
    result = CliRunner().invoke(main, ["-q", "calibrate", str(inputs.shared["llama"]), "-o", out, "--kv-cache", fmt, *FAST])
    assert result.exit_code == 0, result.output
    return out


def _odd_head_opt(inputs: Inputs) -> str:
    """An OPT whose attention heads have 15 dimensions (hidden 30, 2 heads)."""
    from conftest import _save_hf
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=2048, hidden_size=30, word_embed_proj_dim=30, num_attention_heads=2, ffn_dim=64,
                       num_hidden_layers=1, max_position_embeddings=256)
    return str(_save_hf(OPTForCausalLM(config).eval(), inputs.root / "opt-odd-heads"))


def _rotated_checkpoint(inputs: Inputs) -> str:
    out = inputs.path("rotated")
    result = CliRunner().invoke(main, ["-q", "calibrate", str(inputs.shared["llama"]), "-o", out, "--wbits", "4",
                                       "--rotate", "hadamard", *FAST])
    assert result.exit_code == 0, result.output
    return out


def _flip_library_bytes(library: Path) -> None:
    code = bytearray(library.read_bytes())
    code[len(code) // 2] ^= 0xFF
    library.write_bytes(bytes(code))


def _replace_library(library: Path) -> None:
    """Another valid shared library under the recorded name (a Python extension module)."""
    import _ctypes

    shutil.copyfile(_ctypes.__file__, library)


def _open_folder(inputs: Inputs, name: str, mode: int) -> str:
    folder = inputs.root / name
    folder.mkdir()
    folder.chmod(mode)
    return str(folder)


def _graph_of_other_weights(inputs: Inputs) -> str:
    import onnx

    graph = onnx.load(inputs.onnx("other.onnx"))
    for prop in graph.metadata_props:
        if prop.key == "lrq.source_weights_sha256":
            prop.value = "0" * 64
    onnx.save(graph, str(inputs.root / "other.onnx"))
    return str(inputs.root / "other.onnx")


def _tasks_with_a_broken_yaml(inputs: Inputs) -> str:
    inputs.file("tasks/mine.jsonl", '{"q": "a", "choices": ["x", "y"], "label": 0}\n')
    inputs.file("tasks/mine.yaml", f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                f"{inputs.root / 'tasks' / 'mine.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n")
    inputs.file("tasks/other.yaml", "task: other\n  dataset_path: [unclosed\n")
    return inputs.path("tasks")


CPU_KERNEL_EXPORT = lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--cpu-kernels"]  # noqa: E731

CASES = [
    # calibrate: the model
    Case("calibrate-missing-model", lambda i: ["calibrate", i.path("nope"), "-o", i.path("o")], "does not exist"),
    Case("calibrate-not-a-model-dir", lambda i: ["calibrate", i.file("m/readme.txt", "x") and i.path("m"), "-o", i.path("o")],
         "is not a model directory"),
    Case("calibrate-file-as-model", lambda i: ["calibrate", i.file("m.txt", "x"), "-o", i.path("o")], "is not a model directory"),
    Case("calibrate-unsupported-architecture", lambda i: ["calibrate", _config(i, {"model_type": "gpt2"}), "-o", i.path("o")],
         "unsupported architecture 'gpt2' (supported: llama (llama, mistral, qwen2), qwen3 (qwen3), gemma (gemma, "
         "gemma2, gemma3_text), phi3 (phi3), moe (mixtral, qwen3_moe), opt"),
    Case("calibrate-rotate-unrotatable-family", lambda i: ["calibrate", _tiny_family(i, "gemma2"), "-o", i.path("o"),
                                                             "--rotate", "hadamard", *FAST],
         "--rotate hadamard: a gemma model cannot be rotated exactly (rotations fold into"),
    Case("calibrate-rotate-offloaded", lambda i: ["calibrate", i.model(), "-o", i.path("o"), "--rotate", "orthogonal",
                                                  "--offload", *FAST],
         "--rotate orthogonal needs the whole model in memory; drop --offload"),
    Case("calibrate-scheme-rule-matches-nothing", lambda i: ["calibrate", i.model(), "-o", i.path("o"),
                                                              "--scheme-for", "donw_proj=w4a16", *FAST],
         "scheme rule 'donw_proj' matches no quantizable module"),
    Case("calibrate-scheme-rule-unknown-scheme", lambda i: ["calibrate", i.model(), "-o", i.path("o"),
                                                             "--scheme-for", "lm_head=int4"],
         "--scheme-for 'lm_head=int4': unknown scheme 'int4'"),
    Case("calibrate-scheme-rule-without-scheme", lambda i: ["calibrate", i.model(), "-o", i.path("o"),
                                                             "--scheme-for", "lm_head"], "write PATTERN=SCHEME"),
    Case("calibrate-recipe-missing", lambda i: ["calibrate", i.model(), "-o", i.path("o"), "--recipe", i.path("r.yaml")],
         "r.yaml: no such file"),
    Case("calibrate-recipe-not-yaml", lambda i: ["calibrate", i.model(), "-o", i.path("o"),
                                                 "--recipe", i.file("r.yaml", "layers: [down_proj")],
         "not a readable YAML recipe"),
    Case("calibrate-budget-below-smallest", lambda i: ["calibrate", i.model(), "-o", i.path("o"), "--effective-bits",
                                                        "1.5", *FAST],
         "--effective-bits 1.5 is below the smallest the candidates reach on this model"),
    Case("calibrate-budget-activation-candidate", lambda i: ["calibrate", i.model(), "-o", i.path("o"),
                                                              "--effective-bits", "4", "--candidates", "w4a8,w8a8"],
         "--candidates: the bit-budget search chooses weight-only schemes; W4A8-asym, W8A8-asym quantize activations"),
    Case("calibrate-kv-cache-encoder-family", lambda i: ["calibrate", _tiny_vit(i), "-o", i.path("o"), "--kv-cache",
                                                          "int8", *FAST[:2]],
         "--kv-cache int8: vit models keep no KV cache lrq can quantize"),
    Case("calibrate-kv-cache-int4-odd-head", lambda i: ["calibrate", _odd_head_opt(i), "-o", i.path("o"), "--kv-cache",
                                                         "int4", *FAST],
         "this model's heads have 15 dimensions (odd): use --kv-cache int8 or fp8"),
    Case("calibrate-kv-cache-unknown", lambda i: ["calibrate", i.model(), "-o", i.path("o"), "--kv-cache", "int2"],
         "Invalid value for '--kv-cache'"),
    Case("calibrate-kv-rotate-without-cache", lambda i: ["calibrate", i.model(), "-o", i.path("o"), "--kv-rotate"],
         "--kv-rotate rotates the keys of a quantized KV cache: add --kv-cache int8 | int4 | fp8"),
    Case("export-kv-cache-genai", lambda i: ["export", _kv_checkpoint(i, "int8"), "--genai", i.path("g")],
         "--genai: onnxruntime-genai keeps the KV cache in float and cannot run a graph that keeps the int8 cache"),
    Case("export-kv-cache-trt", lambda i: ["export", _kv_checkpoint(i, "int4"), "--onnx", i.path("m.onnx"), "--target",
                                           "trt"],
         "--target trt graphs cannot carry the int4 KV cache yet"),
    Case("export-kv-cache-vllm", lambda i: ["export", _kv_checkpoint(i, "int4"), "--vllm", i.path("v")],
         "--vllm cannot carry an int4 KV cache: vLLM reads a static FP8 cache only"),
    Case("export-kv-cache-option-vllm", lambda i: ["export", i.checkpoint(), "--vllm", i.path("v"), "--kv-cache", "int8"],
         "--kv-cache int8 on export makes --onnx graphs"),
    Case("export-kv-cache-option-other-cache", lambda i: ["export", _kv_checkpoint(i, "int4"), "--onnx", i.path("x.onnx"),
                                                          "--kv-cache", "int8"],
         "--kv-cache int8: this checkpoint was calibrated with the int4 KV cache"),
    Case("export-kv-cache-option-full-precision", lambda i: ["export", "bundled:llama", "--onnx", i.path("x.onnx"),
                                                             "--kv-cache", "int8"],
         "--kv-cache int8 on export applies to lrq checkpoints"),
    Case("export-vllm-packed-parts-differ", lambda i: ["export", _q_proj_w8_checkpoint(i), "--vllm", i.path("v")],
         "but they have the schemes W4A16, W8A16; give them one scheme"),
    Case("calibrate-rotate-unknown", lambda i: ["calibrate", i.model(), "-o", i.path("o"), "--rotate", "spin"],
         "Invalid value for '--rotate'"),
    Case("calibrate-config-not-json", lambda i: ["calibrate", _config(i, "{not json"), "-o", i.path("o")], "is not valid JSON"),
    Case("calibrate-config-not-object", lambda i: ["calibrate", _config(i, "[1, 2]"), "-o", i.path("o")], "is not a model config"),
    Case("calibrate-pickle-weights-only", lambda i: ["calibrate", _pickle_only_model(i), "-o", i.path("o")],
         "holds pytorch_model.bin but no .safetensors weights; lrq does not unpickle"),
    Case("calibrate-truncated-hf-weights", lambda i: ["calibrate", _truncated_hf_weights(i), "-o", i.path("o")], "is truncated"),
    Case("calibrate-nan-weights", lambda i: ["calibrate", _poisoned_weights(i, float("nan")), "-o", i.path("o"), *FAST],
         "contains NaN or inf values"),
    Case("calibrate-inf-weights", lambda i: ["calibrate", _poisoned_weights(i, float("inf")), "-o", i.path("o"), *FAST],
         "contains NaN or inf values"),
    # calibrate: config and weights that disagree, found from the safetensors headers before loading
    Case("calibrate-config-claims-more-layers", lambda i: ["calibrate", _config(i, {**_llama_config(i), "num_hidden_layers": 5}),
                                                           "-o", i.path("o")], "config.json describes 5 layers but the weights hold 2"),
    Case("calibrate-config-other-width", lambda i: ["calibrate", _config(i, {**_llama_config(i), "intermediate_size": 96}),
                                                    "-o", i.path("o")], "config.json and the weights are of different models"),
    Case("calibrate-config-missing-field", lambda i: ["calibrate", _config(i, {k: v for k, v in _llama_config(i).items()
                                                                               if k != "hidden_size"}), "-o", i.path("o")],
         "config.json and the weights are of different models; it has no hidden_size, so transformers' default was used"),
    Case("calibrate-config-heads-do-not-divide-width", lambda i: ["calibrate", _config(i, {**_llama_config(i), "hidden_size": 66}),
                                                                  "-o", i.path("o")],
         "config.json is not a usable llama config (The hidden size (66) is not a multiple of the number of attention heads"),
    Case("calibrate-config-without-width-or-heads", lambda i: ["calibrate", _config(i, {
        k: v for k, v in _llama_config(i).items() if k not in ("hidden_size", "num_attention_heads", "num_key_value_heads")}),
        "-o", i.path("o")], "it has no hidden_size, num_attention_heads, so transformers' default was used"),
    Case("calibrate-integer-weights", lambda i: ["calibrate", _edited_weights(i, _integer_weight), "-o", i.path("o")],
         "is stored as I8"),
    Case("calibrate-weights-header-length", lambda i: ["calibrate", _damaged_header(i, b"\xff" * 8), "-o", i.path("o")],
         "not a safetensors file: bad header length"),
    Case("calibrate-weights-header-not-json", lambda i: ["calibrate", _damaged_header(i, b"\x10\x00\x00\x00\x00\x00\x00\x00"
                                                                                     + b"]" * 16), "-o", i.path("o")],
         "safetensors header is not JSON"),
    Case("calibrate-index-names-missing-shard", lambda i: ["calibrate", _index_naming_a_missing_shard(i), "-o", i.path("o")],
         "does not exist (named by the safetensors index)"),
    Case("calibrate-tokenizer-missing", lambda i: ["calibrate", _without_files(i, "tokenizer.json", "tokenizer_config.json",
                                                                               "special_tokens_map.json"), "-o", i.path("o")],
         "no tokenizer files (none of tokenizer.json"),
    Case("calibrate-tokenizer-damaged", lambda i: ["calibrate", (m := i.model()) and i.file("model/tokenizer.json", "{oops")
                                                   and str(m), "-o", i.path("o")], "cannot load its tokenizer (present: tokenizer.json"),
    Case("calibrate-timm-integer-weights", lambda i: ["calibrate", _timm_int_weights(i), "-o", i.path("o")], "is stored as torch.int8"),
    Case("calibrate-timm-spec-malformed", lambda i: ["calibrate", "timm:vit_tiny", "-o", i.path("o")],
         "timm models are named timm:MODEL_NAME@WEIGHTS.safetensors"),
    Case("calibrate-timm-not-a-vit", lambda i: ["calibrate", _timm_with(i, {}, "resnet18"), "-o", i.path("o")],
         "unsupported architecture: timm model 'resnet18' is a ResNet (supported: llama"),
    Case("calibrate-timm-json-checkpoint-path", lambda i: ["calibrate", _timm_with(i, {"checkpoint_path": "/x.pth"}), "-o", i.path("o")],
         "timm.json kwargs may not set checkpoint_path"),
    # calibrate: numerics and sample options
    Case("calibrate-wbits-5", lambda i: ["calibrate", "-o", i.path("o"), "--wbits", "5"], "wbits must be one of 2, 3, 4, 6, 8, 16"),
    Case("calibrate-act-asym-without-activation-bits", lambda i: ["calibrate", "-o", i.path("o"), "--act-asym"],
         "asymmetric activations (--act-asym) need quantized activations: set --abits below 16"),
    Case("calibrate-abits-3", lambda i: ["calibrate", "-o", i.path("o"), "--abits", "3"], "abits must be one of 4, 6, 8, 16"),
    Case("calibrate-w16a16", lambda i: ["calibrate", "-o", i.path("o"), "--wbits", "16"], "quantizes nothing"),
    Case("calibrate-group-size-0", lambda i: ["calibrate", "-o", i.path("o"), "--group-size", "0"], "group size must be an even number"),
    Case("calibrate-group-size-negative", lambda i: ["calibrate", "-o", i.path("o"), "--group-size", "-64"],
         "group size must be an even number"),
    Case("calibrate-group-size-not-dividing", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--group-size", "48", *FAST],
         "group size 48 does not divide"),
    Case("calibrate-group-size-beyond-k", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--group-size", "512", *FAST],
         "group size 512 does not divide"),
    Case("calibrate-nvfp4-group-32", lambda i: ["calibrate", "-o", i.path("o"), "--wformat", "nvfp4", "--group-size", "32"],
         "nvfp4 weights are 4-bit with blocks of 16: use --wbits 4 --group-size 16"),
    Case("calibrate-fp8-activations-integer-weights", lambda i: ["calibrate", "-o", i.path("o"), "--aformat", "fp8"],
         "fp8 activations need fp8 weights"),
    Case("calibrate-nvfp4-weights-int8-activations", lambda i: ["calibrate", "-o", i.path("o"), "--wformat", "nvfp4",
                                                                 "--abits", "8"], "nvfp4 weights take nvfp4 or 16-bit activations"),
    Case("calibrate-nsamples-0", lambda i: ["calibrate", "-o", i.path("o"), "--nsamples", "0"], "nsamples must be >= 1"),
    Case("calibrate-seq-len-1", lambda i: ["calibrate", "-o", i.path("o"), "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
    Case("calibrate-seq-len-beyond-positions", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--seq-len", "1024"],
         "--seq-len must lie in 2..256 for this model, got 1024"),
    Case("calibrate-vit-seq-len", lambda i: ["calibrate", "bundled:vit", "-o", i.path("o"), "--seqlen", "1000000"],
         "--seq-len applies to language models"),
    Case("calibrate-batch-size-0", lambda i: ["calibrate", "-o", i.path("o"), "--batch-size", "0"], "batch size must be >= 1"),
    Case("calibrate-epochs-negative", lambda i: ["calibrate", "-o", i.path("o"), "--method", "lrquant", "--epochs", "-1"],
         "--epochs must be an integer >= 0"),
    Case("calibrate-alpha-out-of-range", lambda i: ["calibrate", "-o", i.path("o"), "--method", "smoothquant", "--alpha", "1.5"],
         "--alpha must lie in [0, 1]"),
    Case("calibrate-option-of-another-method", lambda i: ["calibrate", "-o", i.path("o"), "--epochs", "3"],
         "--epochs does not apply to method rtn"),
    Case("calibrate-lr-not-finite", lambda i: ["calibrate", "-o", i.path("o"), "--method", "lrquant", "--lr-lwc", "nan"],
         "--lr-lwc must be a finite number > 0"),
    Case("calibrate-bits-not-a-number", lambda i: ["calibrate", "-o", i.path("o"), "--wbits", "four"], "'four' is not a valid integer"),
    Case("calibrate-unknown-method", lambda i: ["calibrate", "-o", i.path("o"), "--method", "gptq4"], "'gptq4' is not one of"),
    Case("calibrate-cuda-without-gpu", lambda i: ["calibrate", "-o", i.path("o"), "--device", "cuda"], "no CUDA device", "no-cuda"),
    # calibrate: calibration text
    Case("calibrate-calib-data-missing", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--calib-data", i.path("no.txt")],
         "data file"),
    Case("calibrate-calib-data-directory", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--calib-data",
                                                      Path(i.file("texts/a.txt", "x")).parent, *FAST],
         "is a directory; give a UTF-8 text file"),
    Case("calibrate-calib-data-fifo", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--calib-data", _fifo(i)],
         "is a pipe or socket"),
    Case("calibrate-calib-data-device", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--calib-data", "/dev/zero"],
         "is a device"),
    Case("calibrate-output-empty", lambda i: ["calibrate", "-o", ""], "is empty; name a file or directory"),
    Case("calibrate-output-name-too-long", lambda i: ["calibrate", "-o", i.path("q" * 250)], "choose a shorter name"),
    Case("calibrate-calib-data-empty", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--calib-data", i.file("e.txt", "")],
         "is empty"),
    Case("calibrate-calib-data-whitespace", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"),
                                                       "--calib-data", i.file("w.txt", " \n\t\n")], "is empty"),
    Case("calibrate-calib-data-tiny", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"), "--calib-data", i.file("t.txt", "hi"), *FAST],
         "at least 17 are needed for seqlen 16"),
    Case("calibrate-calib-data-binary", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"),
                                                   "--calib-data", i.file("b.bin", bytes(range(256)) * 4)], "is not UTF-8 text"),
    Case("calibrate-calib-data-latin1", lambda i: ["calibrate", i.shared["llama"], "-o", i.path("o"),
                                                   "--calib-data", i.file("l.txt", "caf\xe9 na\xefve ".encode("latin-1") * 50)],
         "is not UTF-8 text"),
    Case("calibrate-calib-data-for-vit", lambda i: ["calibrate", "bundled:vit", "-o", i.path("o"), "--calib-data", i.file("t.txt", "text")],
         "is not an image folder (ImageFolder layout: DIR/CLASS/IMAGE)"),
    # calibrate: outputs and runs
    Case("calibrate-output-not-empty", lambda i: ["calibrate", "-o", Path(i.file("o/keep.txt", "mine")).parent],
         "is not empty (use --force"),
    Case("calibrate-output-is-file", lambda i: ["calibrate", "-o", i.file("o", "mine")], "exists and is not a directory"),
    Case("calibrate-output-parent-is-file", lambda i: ["calibrate", "-o", i.file("f", "mine") + "/o"], "is not a directory"),
    Case("calibrate-output-read-only", lambda i: ["calibrate", "-o", i.read_only_dir() + "/o"], "cannot write to"),
    Case("calibrate-run-dir-of-the-user", lambda i: ["calibrate", "-o", i.path("o"), "--method", "lrquant",
                                                     "--run-dir", Path(i.file("mine/notes.txt", "keep")).parent],
         "holds files lrq did not write (notes.txt)"),
    Case("calibrate-run-dir-earlier-run", lambda i: _run_dir(i), "holds an earlier run: continue it with --resume"),
    Case("calibrate-resume-other-settings", lambda i: [*_run_dir(i), "--resume", "--batch-size", "2"],
         "was made with calib.batch_size=1 (now 2)"),
    Case("calibrate-resume-damaged-run-json", lambda i: [*_run_dir(i, "{oops"), "--resume"], "run.json is damaged"),
    Case("calibrate-resume-damaged-report", lambda i: [*_run_dir(i, report="[1]"), "--resume"], "report.json is damaged"),
    # eval
    Case("eval-missing-checkpoint", lambda i: ["eval", i.path("none")], "does not exist"),
    Case("eval-not-a-checkpoint", lambda i: ["eval", str(i.model())], "is not an lrq checkpoint (no manifest.json)"),
    Case("eval-manifest-deleted", lambda i: ["eval", _damaged(i, lambda c: (c / "manifest.json").unlink())], "no manifest.json"),
    Case("eval-manifest-invalid-json", lambda i: ["eval", _damaged(i, lambda c: (c / "manifest.json").write_text("{"))], "is corrupt"),
    Case("eval-manifest-future-version", lambda i: ["eval", _damaged(i, _edit_manifest(lambda m: m.update(format_version=99)))],
         "format version 99; this lrq-deploy reads up to"),
    Case("eval-manifest-edited-scheme", lambda i: ["eval", _damaged(i, _edit_manifest(
        lambda m: m["quant"].update(wbits=8), resign=False))], "manifest.json was edited after lrq wrote it"),
    Case("info-manifest-edited-scheme", lambda i: ["info", _damaged(i, _edit_manifest(
        lambda m: m["quant"].update(symmetric=True), resign=False))], "is not intact: manifest.json: edited", report=True),
    Case("eval-manifest-without-quant", lambda i: ["eval", _damaged(i, _edit_manifest(lambda m: m.pop("quant")))], "lacks quant"),
    Case("eval-manifest-unknown-family", lambda i: ["eval", _damaged(i, _edit_manifest(lambda m: m.update(family="gpt2")))],
         "unknown model family 'gpt2'"),
    Case("eval-manifest-wrong-family", lambda i: ["eval", _damaged(i, _edit_manifest(lambda m: m.update(family="bert")))],
         "manifest.json names family 'bert', but its config.json is a 'llama' model"),
    Case("eval-flipped-byte", lambda i: ["eval", _damaged(i, _flip_byte)], "model.safetensors does not match manifest.json (sha256 differs)"),
    Case("eval-truncated-weights", lambda i: ["eval", _damaged(i, _truncate)], "model.safetensors does not match manifest.json (size differs)"),
    Case("eval-weights-deleted", lambda i: ["eval", _damaged(i, lambda c: (c / "model.safetensors").unlink())],
         "model.safetensors does not match manifest.json (missing)"),
    Case("eval-missing-tensor", lambda i: ["eval", _damaged(i, _drop_tensor)], "does not match its manifest (missing 1"),
    Case("eval-limit-0", lambda i: ["eval", i.checkpoint(), "--limit", "0"], "--limit must be >= 1, got 0"),
    Case("eval-limit-negative", lambda i: ["eval", i.checkpoint(), "--limit", "-1"], "--limit must be >= 1, got -1"),
    Case("eval-seq-len-0", lambda i: ["eval", i.checkpoint(), "--seq-len", "0"], "--seq-len must lie in 2..256"),
    Case("eval-data-too-short", lambda i: ["eval", i.checkpoint(), "--data", i.file("d.txt", "abc")], "fewer than one window"),
    Case("eval-data-empty", lambda i: ["eval", i.checkpoint(), "--data", i.file("d.txt", "")], "is empty"),
    Case("eval-data-binary", lambda i: ["eval", i.checkpoint(), "--data", i.file("d.bin", bytes(range(256)) * 8)], "is not UTF-8 text"),
    Case("eval-data-missing", lambda i: ["eval", i.checkpoint(), "--data", i.path("none.txt")], "does not exist"),
    Case("eval-data-not-utf8", lambda i: ["eval", i.checkpoint(), "--data", i.file("d.bin", b"\xff\xfe\x00" * 100)], "is not UTF-8 text"),
    Case("eval-data-directory", lambda i: ["eval", i.checkpoint(), "--data", Path(i.file("texts/a.txt", "x")).parent],
         "is a directory"),
    Case("eval-wrong-metric", lambda i: ["eval", i.checkpoint(), "--metric", "top1"], "does not apply to a causal_lm model"),
    Case("eval-unknown-lm-eval-task", lambda i: ["eval", i.checkpoint(), "--tasks", "no_such_task"], "unknown lm-eval task"),
    Case("eval-task-options-without-tasks", lambda i: ["eval", i.checkpoint(), "--num-fewshot", "2"], "go with --tasks"),
    Case("eval-task-path-missing", lambda i: ["eval", i.checkpoint(), "--tasks", "x", "--task-path", i.path("none")],
         "is not a directory of task YAML files"),
    # export
    # data-loss paths: --force never reaches an input or what lrq did not write (tests/test_outputs.py: every command)
    Case("calibrate-output-is-the-model", lambda i: ["calibrate", (m := i.model()), "-o", m, "--force"], "is the input"),
    Case("calibrate-force-over-user-directory", lambda i: ["calibrate", "-o", Path(i.file("mine/notes.txt", "x")).parent,
                                                           "--force"], "is not an lrq checkpoint"),
    Case("export-vllm-rotated-online", lambda i: ["export", _rotated_checkpoint(i), "--vllm", i.path("v")],
         "--vllm cannot carry lrq's online rotation before down_proj"),
    Case("export-vllm-over-the-checkpoint", lambda i: ["export", (c := i.checkpoint()), "--vllm", c, "--force"],
         "is the input"),
    Case("export-onnx-inside-the-checkpoint", lambda i: ["export", (c := i.checkpoint()), "--onnx", c / "model.safetensors",
                                                         "--force"], "lies inside the input"),
    Case("export-onnx-over-a-user-file", lambda i: ["export", i.checkpoint(), "--onnx", i.file("notes.onnx", "x"), "--force"],
         "is not an lrq ONNX graph"),
    Case("export-triton-repo-is-the-graph", lambda i: ["export", i.checkpoint(), "--onnx", (g := i.path("g.onnx")),
                                                       "--triton-repo", g], "overlap"),
    Case("bench-export-json-exists", lambda i: ["bench", i.onnx(), "--export-json", i.file("b.json", "{}")],
         "exists (use --force"),
    Case("bench-export-json-force-over-a-user-file", lambda i: ["bench", i.onnx(), "--export-json", i.file("b.json", "{}"),
                                                                "--force"], "is not an lrq benchmark record"),
    Case("bench-export-times-with-compare", lambda i: ["bench", "--compare", (g := i.onnx()), g, "--export-times",
                                                       i.path("t.json")], "--export-times does nothing with --compare"),
    Case("bench-warm-up-with-decode", lambda i: ["bench", "--decode", i.checkpoint(), "--warm-up", "10"],
         "--warm-up does nothing with --decode"),
    Case("export-batch-0", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--batch", "0"], "--batch must be >= 1"),
    Case("export-seq-len-negative", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--seq-len", "-5"],
         "--seq-len must be >= 1"),
    Case("export-seq-len-beyond-positions", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--seq-len", "4096"],
         "--seq-len must lie in 2..256"),
    Case("export-limit-0", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--limit", "0"], "--limit must be >= 1"),
    Case("export-with-past-static", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--with-past", "--batch", "1"],
         "--with-past graphs keep dynamic"),
    Case("export-onnx-is-directory", lambda i: ["export", i.checkpoint(), "--onnx", Path(i.file("d/x", "")).parent], "is a directory"),
    Case("export-onnx-parent-missing", lambda i: ["export", i.checkpoint(), "--onnx", i.path("no/x.onnx")], "does not exist"),
    Case("export-onnx-exists", lambda i: ["export", i.checkpoint(), "--onnx", i.file("x.onnx", "mine")], "exists (use --force"),
    Case("export-onnx-read-only", lambda i: ["export", i.checkpoint(), "--onnx", i.read_only_dir() + "/x.onnx"], "cannot write to"),
    Case("export-opset-too-low", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--opset", "20"],
         "opset 20 is too low for W4 weights with target ort: the minimum is 21"),
    Case("export-opset-before-quantization", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--opset", "13"],
         "--opset must lie in 18.."),
    Case("export-opset-beyond-the-runtime", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"), "--opset", "99"],
         "--opset must lie in 18.."),
    Case("export-onnx-empty", lambda i: ["export", i.checkpoint(), "--onnx", ""], "is empty"),
    Case("export-onnx-name-too-long", lambda i: ["export", i.checkpoint(), "--onnx", i.path("g" * 240 + ".onnx")],
         "choose a shorter name"),
    Case("export-int8-activations-not-w4a16", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"),
                                                         "--ort-int8-activations", "--target", "trt"],
         "--ort-int8-activations applies to group-wise W4A16"),
    Case("export-cpu-kernels-for-tensorrt", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"),
                                                       "--cpu-kernels", "--target", "trt"],
         "--cpu-kernels is lrq's onnxruntime CPU kernel"),
    Case("export-cpu-kernels-full-precision", lambda i: ["export", str(i.model()), "--onnx", i.path("x.onnx"),
                                                         "--cpu-kernels", "--no-verify"],
         "no linear of this graph fits lrq's CPU kernel"),
    Case("export-not-a-checkpoint", lambda i: ["export", i.file("c.txt", "x"), "--onnx", i.path("x.onnx")], "is not an lrq checkpoint"),
    Case("export-tampered-checkpoint", lambda i: ["export", _damaged(i, _flip_byte), "--onnx", i.path("x.onnx")], "sha256 differs"),
    # build-engine
    Case("build-fp4-for-sm89", lambda i: ["build-engine", i.onnx(), "-o", i.path("x.engine"), "--fp4", "--sm", "89"],
         "--fp4 needs compute capability 10.0 or newer (Blackwell); SM89 cannot run it"),
    Case("build-missing-onnx", lambda i: ["build-engine", i.path("no.onnx"), "-o", i.path("x.engine")], "does not exist"),
    Case("build-empty-onnx", lambda i: ["build-engine", i.file("e.onnx", b""), "-o", i.path("x.engine")], "is empty (0 bytes)"),
    Case("build-text-as-onnx", lambda i: ["build-engine", i.file("t.onnx", "hello, not a graph " * 20), "-o", i.path("x.engine")],
         "ONNX model"),
    Case("build-onnx-from-another-tool", lambda i: ["build-engine", _foreign_onnx(i), "-o", i.path("x.engine")],
         "--int4 needs a graph with INT4 weights", "trt"),
    Case("build-ort-flavoured-onnx", lambda i: ["build-engine", i.onnx(), "-o", i.path("x.engine")], "export with --target trt"),
    Case("build-output-is-input", lambda i: ["build-engine", (p := i.onnx()), "-o", p, "--force"], "is the input"),
    Case("build-output-exists", lambda i: ["build-engine", i.onnx(), "-o", i.file("x.engine", "mine")], "exists (use --force"),
    Case("build-output-read-only", lambda i: ["build-engine", i.onnx(), "-o", i.read_only_dir() + "/x.engine"], "cannot write to"),
    Case("build-shapes-min-above-max", lambda i: ["build-engine", i.onnx(), "-o", i.path("x.engine"), "--min-shapes", "input_ids:1x16",
                                                  "--opt-shapes", "input_ids:1x16", "--max-shapes", "input_ids:1x8"],
         "must satisfy min <= opt <= max"),
    Case("build-shapes-malformed", lambda i: ["build-engine", i.onnx(), "-o", i.path("x.engine"), "--min-shapes", "input_ids:1xA",
                                              "--opt-shapes", "input_ids:1x8", "--max-shapes", "input_ids:1x8"], "shapes are name:DxDx"),
    Case("build-shapes-different-inputs", lambda i: ["build-engine", i.onnx(), "-o", i.path("x.engine"), "--min-shapes", "a:1",
                                                     "--opt-shapes", "b:1", "--max-shapes", "a:1"], "must name the same inputs"),
    Case("build-timing-cache-unusable", lambda i: ["build-engine", _foreign_onnx(i), "-o", i.path("x.engine"), "--fp16", "--sm", "89",
                                                   "--timing-cache", i.file("cache.bin", "not a timing cache")],
         "--timing-cache", "trt"),
    Case("build-unknown-sm", lambda i: ["build-engine", _foreign_onnx(i), "-o", i.path("x.engine"), "--fp16", "--sm", "42"],
         "cannot target 42", "trt"),
    # bench
    Case("bench-missing-target", lambda i: ["bench", i.path("none.onnx")], "does not exist"),
    Case("bench-unknown-kind", lambda i: ["bench", i.file("m.txt", "x")], "cannot tell what"),
    Case("bench-export-record-not-json", lambda i: ["bench", i.file("g/lrq-export.json", "{not json") and i.path("g")],
         "is not a readable export record"),
    Case("bench-export-directory-without-graph", lambda i: ["bench", "--decode", i.file(
        "g/lrq-export.json", '{"format": "lrq-genai/1", "graph": "model.onnx"}') and i.path("g")],
         "is an lrq export directory without its graph model.onnx"),
    Case("bench-iterations-0", lambda i: ["bench", i.onnx(), "--iterations", "0"], "--iterations must be >= 1, got 0"),
    Case("bench-percentile-150", lambda i: ["bench", i.onnx(), "--percentile", "150"], "--percentile values must lie in (0, 100], got 150"),
    Case("bench-percentile-not-number", lambda i: ["bench", i.onnx(), "--percentile", "p99"], "--percentile takes comma-separated numbers"),
    Case("bench-duration-negative", lambda i: ["bench", i.onnx(), "--duration", "-1"], "--duration must be >= 0, got -1"),
    Case("bench-warm-up-negative", lambda i: ["bench", i.onnx(), "--warm-up", "-5"], "--warm-up must be >= 0, got -5"),
    Case("bench-batch-0", lambda i: ["bench", i.onnx(), "--batch", "0"], "--batch must be >= 1, got 0"),
    Case("bench-seq-len-beyond-positions", lambda i: ["bench", i.onnx(), "--seq-len", "100000"], "exceeds the 256 positions"),
    Case("bench-ort-cuda-without-provider", lambda i: ["bench", i.onnx(), "--device", "cuda"], "has no CUDA provider", "no-cuda"),
    Case("bench-onnx-named-engine", lambda i: ["bench", _onnx_named_engine(i)], "is an ONNX graph named like an engine"),
    Case("bench-engine-on-cpu", lambda i: ["bench", i.file("m.engine", b"x"), "--device", "cpu"], "TensorRT engines run on a CUDA GPU"),
    Case("bench-decode-engine", lambda i: ["bench", "--decode", i.file("m.engine", b"x")], "--decode runs checkpoints"),
    Case("bench-decode-prefill-graph", lambda i: ["bench", "--decode", i.onnx()], "export it with lrq export --with-past"),
    Case("bench-decode-new-tokens-1", lambda i: ["bench", "--decode", i.onnx(), "--new-tokens", "1"], "--new-tokens must be >= 2"),
    Case("bench-compare-one-target", lambda i: ["bench", "--compare", i.onnx()], "--compare needs at least two targets"),
    Case("bench-export-json-parent-missing", lambda i: ["bench", i.onnx(), "--export-json", i.path("no/x.json")], "does not exist"),
    Case("bench-export-json-read-only", lambda i: ["bench", i.onnx(), "--export-json", i.read_only_dir() + "/x.json"], "cannot write to"),
    Case("bench-engine-other-tensorrt", lambda i: ["bench", _engine_with_record(i, tensorrt_version="0.0.1")],
         "was built with", "trt"),
    Case("bench-engine-tampered", lambda i: ["bench", _tampered_engine(i)], "does not match the sha256 in its build record", "trt"),
    # native code: verified before it runs
    Case("bench-genai-library-deleted", lambda i: ["bench", "--decode", _genai_directory(i, Path.unlink)],
         "native library libai_lrq_cpu.so is missing"),
    Case("bench-genai-library-truncated", lambda i: ["bench", "--decode", _genai_directory(
        i, lambda p: p.write_bytes(p.read_bytes()[:4096]))], "native library libai_lrq_cpu.so is changed since export"),
    Case("bench-genai-library-bytes-flipped", lambda i: ["bench", "--decode", _genai_directory(i, _flip_library_bytes)],
         "native library libai_lrq_cpu.so is changed since export"),
    Case("bench-genai-library-replaced", lambda i: ["bench", "--decode", _genai_directory(i, _replace_library)],
         "native library libai_lrq_cpu.so is changed since export"),
    Case("bench-genai-unrecorded-library", lambda i: ["bench", "--decode", _genai_directory(i, extra="libplugin.so")],
         "libplugin.so is native code the export did not record"),
    Case("info-genai-library-deleted", lambda i: ["info", _genai_directory(i, Path.unlink)],
         "is not intact: native library libai_lrq_cpu.so is missing", report=True),
    Case("info-genai-library-changed", lambda i: ["info", _genai_directory(i, _flip_library_bytes)],
         "is not intact: native library libai_lrq_cpu.so is changed since export", report=True),
    Case("export-cpu-kernels-world-writable-cache", CPU_KERNEL_EXPORT, "is writable by every user",
         env=lambda i: {"LRQ_CACHE": str(Path(_open_folder(i, "cache", 0o777)))}),
    Case("export-cpu-kernels-cache-in-a-world-writable-folder", CPU_KERNEL_EXPORT, "is writable by every user",
         env=lambda i: {"LRQ_CACHE": _open_folder(i, "shared", 0o777) + "/lrq"}),
    Case("export-cpu-kernels-no-compiler", CPU_KERNEL_EXPORT, "need a C++ compiler",
         env=lambda i: {"CXX": i.path("no-such-compiler")}),
    Case("export-cpu-kernels-isa-unknown", CPU_KERNEL_EXPORT, "LRQ_CPU_KERNEL_ISA must be one of avx512, avx2, portable",
         env=lambda i: {"LRQ_CPU_KERNEL_ISA": "garbage"}),
    Case("export-cpu-kernels-isa-misspelled", CPU_KERNEL_EXPORT, "got 'AVX2'", env=lambda i: {"LRQ_CPU_KERNEL_ISA": "AVX2"}),
    Case("export-allow-outside-tolerance-without-verify", lambda i: ["export", i.checkpoint(), "--onnx", i.path("x.onnx"),
                                                                     "--no-verify", "--allow-outside-tolerance"],
         "drop --no-verify or the option"),
    # options that were accepted silently
    Case("calibrate-resume-without-a-run", lambda i: ["calibrate", str(i.model()), "-o", i.path("o"), "--resume"],
         "there is no run to resume"),
    Case("eval-tasks-num-fewshot-negative", lambda i: ["eval", i.checkpoint(), "--tasks", "piqa", "--num-fewshot", "-1"],
         "--num-fewshot must be >= 0, got -1"),
    Case("eval-tasks-limit-0", lambda i: ["eval", i.checkpoint(), "--tasks", "piqa", "--limit", "0"],
         "--limit must be >= 1 (documents per task), got 0"),
    Case("eval-tasks-limit-negative", lambda i: ["eval", i.checkpoint(), "--tasks", "piqa", "--limit", "-1"],
         "--limit must be >= 1 (documents per task), got -1"),
    Case("eval-tasks-broken-yaml-beside-the-task", lambda i: ["eval", i.checkpoint(), "--tasks", "mine", "--task-path",
                                                             _tasks_with_a_broken_yaml(i)], "other.yaml line 2 is not valid YAML"),
    Case("eval-tasks-onnx-of-another-checkpoint", lambda i: ["eval", i.checkpoint(), "--tasks", "piqa", "--onnx",
                                                            _graph_of_other_weights(i)], "was not exported from"),
    Case("eval-source-model-moved", lambda i: ["eval", _damaged(i, _edit_manifest(
        lambda m: m.update(source=i.path("moved-away")))), "--limit", "2"],
         "the full-precision model this checkpoint was made from, "),
    # info
    Case("info-missing", lambda i: ["info", i.path("none")], "does not exist"),
    Case("info-onnx-named-engine", lambda i: ["info", _onnx_named_engine(i)], "is an ONNX graph named like an engine"),
    Case("info-onnx-without-suffix", lambda i: ["info", str(shutil.copy(i.shared["onnx"], i.root / "model"))],
         "looks like an ONNX graph; name it .onnx"),
    Case("info-unknown-kind", lambda i: ["info", i.file("x.bin", "x")], "cannot tell what"),
    Case("info-flipped-byte", lambda i: ["info", _damaged(i, _flip_byte)], "is not intact: model.safetensors: sha256 differs",
         report=True),
]


def _trt_installed() -> bool:
    from lrq_deploy.runtime.flavours import MODULES

    import importlib.util

    return any(importlib.util.find_spec(m) for m in MODULES.values())


@pytest.fixture(scope="module")
def shared(tiny_llama_dir, tmp_path_factory) -> dict:
    """A W4A16 checkpoint of the tiny LLaMA and its onnxruntime graph, copied by the cases that use them."""
    root = tmp_path_factory.mktemp("bad-inputs-shared")
    ckpt, graph = root / "ckpt", root / "model.onnx"
    runner = CliRunner()
    for args in (["calibrate", tiny_llama_dir, "-o", ckpt, "--nsamples", "2", "--seq-len", "16"],
                 ["export", ckpt, "--onnx", graph, "--no-verify"]):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return {"llama": tiny_llama_dir, "checkpoint": ckpt, "onnx": graph}


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_case(case: Case, root: Path, shared: dict):
    """(exit code, error lines, files before, files after) of one case; stdout must be empty
    unless the command prints a report."""
    inputs = Inputs(root, shared)
    args = [str(a) for a in case.make(inputs)]
    env = case.env(inputs) if case.env else None
    _record(case, args, root, shared)
    before = snapshot(root)
    result = CliRunner().invoke(main, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    shown = result.stderr if case.report else result.output
    lines = [line for line in shown.splitlines() if line.strip()]
    _record(case, args, root, shared, lines)
    return result.exit_code, lines, before, snapshot(root)


def _record(case: Case, args: list[str], root: Path, shared: dict, lines: list[str] | None = None) -> None:
    """With LRQ_BAD_INPUTS_LOG set (scripts/bad_inputs_doc.py), append the case's command and message."""
    log = os.environ.get("LRQ_BAD_INPUTS_LOG")
    if not log or lines is None:
        return

    def tidy(text: str) -> str:
        for path, name in ((root, "."), (shared["llama"], "./tiny-llama"), (shared["checkpoint"].parent, ".")):
            text = text.replace(str(path), name)
        return text

    entry = {"id": case.id, "command": tidy("lrq " + " ".join(args)), "message": tidy(lines[0] if lines else "")}
    with open(log, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, shared, tmp_path):
    if case.needs == "trt" and not _trt_installed():
        pytest.skip("no TensorRT flavour installed")
    if case.needs == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = tmp_path / "case"
    root.mkdir()
    code, lines, before, after = run_case(case, root, shared)
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0], lines[0]
    assert case.message in lines[0], lines[0]
    assert after == before, "the command changed its directory"
    assert not (root / "PWNED").exists(), "a pickle payload was executed"


def test_the_suite_covers_every_command():
    commands = {case.id.split("-")[0] for case in CASES}
    assert {"calibrate", "eval", "export", "build", "bench", "info"} <= commands
    assert len(CASES) >= 40


def test_docs_list_every_case():
    listed = DOC.read_text()
    missing = [case.id for case in CASES if f"`{case.id}`" not in listed]
    assert not missing, f"docs/BAD_INPUTS.md lacks {missing}; regenerate it with python scripts/bad_inputs_doc.py"
