"""`lrq export CKPT --genai DIR`: a directory onnxruntime-genai generates with.

DIR holds model.onnx (the --target ort decoder graph with its KV cache), genai_config.json and
the tokenizer files. The graph is the lrq graph after onnxruntime's own graph optimizations at
the extended level, saved by onnxruntime (its DequantizeLinear + MatMul pairs become MatMulNBits
nodes): the accuracy level lrq verified (1, exact activations; 4 with --ort-int8-activations) is
then written into every MatMulNBits node, where onnxruntime-genai, which cannot pass session
configuration entries, reads it. With --cpu-kernels the linears lrq's CPU kernel serves are
ai.lrq.cpu::MatMulInt4 nodes and DIR also holds the kernel library, which genai_config.json names
(export/ort_optimized.py). That saved graph is what is verified against torch. When
onnxruntime-genai is installed, the directory is also loaded by it and its greedy tokens are
compared with the torch reference's.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from lrq_deploy.artifacts import EXPORT_RECORD, NATIVE_CODE
from lrq_deploy.atomic import OutputKind, atomic_directory, claim_output, is_json_of, output_scope, write_json
from lrq_deploy.errors import LrqError
from lrq_deploy.export.onnx_export import ExportOptions, export_loaded, graph_bytes_at_least
from lrq_deploy.graph_io import ATTENTION_MASK
from lrq_deploy.progress import step
from lrq_deploy.provenance import sha256_of
from lrq_deploy.export.ort_optimized import as_onnxruntime_runs

GRAPH, CONFIG = "model.onnx", "genai_config.json"
KERNEL_LIBRARY = "libai_lrq_cpu.so"  # --cpu-kernels: onnxruntime-genai loads custom-op libraries from the model's directory
MARKER, MARKER_FORMAT = EXPORT_RECORD, "lrq-genai/1"
OUTPUT = OutputKind("onnxruntime-genai export", directory=True,
                    recognise=lambda p: is_json_of(Path(p) / MARKER, "format", MARKER_FORMAT))
INSTALL_HINT = 'pip install "lrq-deploy[genai]"'
# onnxruntime-genai's decoder-only model types (a config.json model_type it does not know runs as
# its generic "decoder": the graph's inputs and outputs are named in genai_config.json either way)
DECODER_TYPES = ("chatglm", "gemma", "gemma2", "gpt2", "granite", "llama", "mistral", "nemotron", "olmo", "phi",
                 "phi3", "qwen2", "qwen3", "smollm3")
GENERATION_TOKENS = 32


@output_scope()
def export_genai(checkpoint, out: Path, options: ExportOptions | None = None) -> dict:
    """Write `out` (module docstring); returns the graph's export report with the genai check
    ("genai_generation": None when onnxruntime-genai is not installed)."""
    out = Path(out)
    options = _genai_options(options or ExportOptions())
    claim_output(out, OUTPUT, options.force, inputs=[checkpoint], option="--genai",
                 need_bytes=graph_bytes_at_least(checkpoint))
    if options.cpu_kernels:
        from lrq_deploy.runtime.cpu_kernels import preflight

        preflight()
    from lrq_deploy.checkpoint import load_source

    with step(f"loading {checkpoint}"):
        ckpt = load_source(checkpoint)
    loaded = ckpt.loaded
    if loaded.adapter.task != "causal_lm":
        raise LrqError(f"--genai exports decoder-only language models; {checkpoint} is a {loaded.adapter.task} model")
    if ckpt.quant is not None and ckpt.quant.kv_cache != "none":
        raise LrqError(f"--genai: onnxruntime-genai keeps the KV cache in float and cannot run a graph that keeps the "
                       f"{ckpt.quant.kv_cache} cache as codes and scales; export --onnx ... --with-past (lrq bench "
                       "--decode runs it)")
    report = {}

    def write(staging: Path) -> None:
        finish = lambda graph, graph_report: as_onnxruntime_runs(graph, graph_report, options)  # noqa: E731
        report.update(export_loaded(ckpt, staging / GRAPH, options, finish))
        kernels = _carry_cpu_kernels(staging) if options.cpu_kernels else {}
        write_json(staging / CONFIG, genai_config(loaded, in_place=report["kv_cache_in_place"],
                                                  kernels=next(iter(kernels), None)))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        if options.verify:
            with step("generating with onnxruntime-genai"):
                report["genai_generation"] = genai_generation(staging, loaded)
        write_json(staging / MARKER, {"format": MARKER_FORMAT, "graph": GRAPH, "source": str(loaded.spec),
                                      "scheme": ckpt.scheme_name, "method": ckpt.method, NATIVE_CODE: kernels})

    atomic_directory(out, write)
    report.update(genai=str(out), onnx=str(out / GRAPH))
    return report


def _carry_cpu_kernels(staging: Path) -> dict:
    """Copy lrq's CPU kernel library (verified) into the directory; its record entry: native code,
    what loads it and where it runs."""
    import platform

    from lrq_deploy.runtime.cpu_kernels import CPU_REQUIREMENT, library

    shutil.copyfile(library(), staging / KERNEL_LIBRARY)
    return {KERNEL_LIBRARY: {"sha256": sha256_of(staging / KERNEL_LIBRARY), "bytes": (staging / KERNEL_LIBRARY).stat().st_size,
                             "machine": platform.machine(), "needs": CPU_REQUIREMENT,
                             "loaded_by": f"onnxruntime-genai ({CONFIG}: session_options.custom_ops_library)"}}


def _genai_options(options: ExportOptions) -> ExportOptions:
    if options.target != "ort":
        raise LrqError("--genai writes an onnxruntime graph: drop --target trt")
    if options.triton_repo is not None:
        raise LrqError("--genai and --triton-repo are separate exports; run them one at a time")
    if options.batch is not None or options.seq_len is not None:
        raise LrqError("--genai graphs keep dynamic batch and sequence axes; drop --batch/--seq-len")
    return replace(options, with_past=True, kv_in_place=True)


def genai_config(loaded, in_place: bool, kernels: str | None = None) -> dict:
    """genai_config.json for the graph lrq exports with --with-past: input_ids and past.N.key /
    past.N.value in, logits and present.N.* out, greedy search by default. A graph whose cache is
    kept in place (GroupQueryAttention) also takes attention_mask, and onnxruntime-genai binds one
    buffer per layer as past and present (past_present_share_buffer); a standard-op graph takes no
    mask (positions follow from the past length) and gets a new present every step. `kernels`: the
    file name, inside the directory, of lrq's CPU kernel library the graph needs (--cpu-kernels)."""
    config = loaded.model.config
    kv_heads, head_dim = loaded.adapter.kv_cache_shape(config)
    context = loaded.adapter.max_sequence_length(loaded.model)
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(loaded.tokenizer, "eos_token_id", None)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "type": config.model_type if config.model_type in DECODER_TYPES else "decoder",
            "bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": pad,
            "vocab_size": config.vocab_size, "context_length": context,
            "decoder": {
                "filename": GRAPH,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    **({"custom_ops_library": kernels} if kernels else {})},
                "head_size": head_dim, "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": kv_heads,
                "inputs": {"input_ids": "input_ids", "past_key_names": "past.%d.key",
                           "past_value_names": "past.%d.value", **({ATTENTION_MASK: ATTENTION_MASK} if in_place else {})},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": in_place, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0},
    }


def genai_generation(directory: Path, loaded, new_tokens: int = GENERATION_TOKENS) -> dict | None:
    """Greedy tokens of onnxruntime-genai loading `directory` against the torch reference's, from
    the first verification window's first 16 tokens; None without onnxruntime-genai."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    from lrq_deploy.export.verify import torch_greedy, verification_prompt

    prompt = verification_prompt(loaded)
    try:
        model = og.Model(str(directory))
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeErrors
        raise LrqError(f"onnxruntime-genai cannot load the export: {str(exc).splitlines()[0]}") from None
    params = og.GeneratorParams(model)
    total = prompt.shape[1] + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt[0].tolist())
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = torch_greedy(loaded, prompt, new_tokens)
    return {"prompt_tokens": int(prompt.shape[1]), "onnxruntime_genai": tokens, "torch": reference,
            "match": tokens == reference, "onnxruntime_genai_version": og.__version__}
