"""`lrq export --onnx`: quantized checkpoint -> QDQ ONNX graph (target ort or trt), verified."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from lrq_deploy.atomic import (
    OutputKind, atomic_write, check_distinct_outputs, claim_output, make_readable, output_scope,
    remove_stale_temporaries, temporary_path, write_json,
)
from lrq_deploy.progress import step
from lrq_deploy.provenance import sha256_of
from lrq_deploy.errors import LrqError
from lrq_deploy.export.attention import lengths_from_mask, pack_qkv
from lrq_deploy.export.fuse import fuse_shared_inputs
from lrq_deploy.export.norms import norms_as_division, residual_norms_as_contrib
from lrq_deploy.export.graph import FLOAT_LAYERS_KEY, default_opset, producers, set_opset
from lrq_deploy.export.lower import lower, required_opset, scheme_opset
from lrq_deploy.export.lower_float import check_float_target
from lrq_deploy.export.ops import TRANSLATIONS
from lrq_deploy.checkpoint import load_source
from lrq_deploy.quant import QuantLinear
from lrq_deploy.quant.scheme import DOMAIN
from lrq_deploy.runtime.onnxrt import ACCURACY_LEVEL_META, INT8_ACTIVATIONS_LEVEL

ALLOW_OUTSIDE_TOLERANCE_META = "lrq.allow_outside_tolerance"  # the user kept a graph that may fail verification

TARGETS = ("ort", "trt")
GRAPH_FORMAT = "lrq-onnx/1"
INLINE_LIMIT = 2**31 - 2**27  # initializer bytes kept inside the .onnx file (protobuf stops at 2 GiB)


@dataclass(frozen=True)
class ExportOptions:
    """How a checkpoint becomes a graph; validated on construction.

    batch / seq_len: static axes (default dynamic). limit: verification samples. with_past: a
    decoder graph with KV-cache inputs and outputs. ort_int8_activations: declare the graph for
    onnxruntime's MatMulNBits at accuracy level 4 (activations rounded to int8 per block of K at
    run time; faster on CPUs, not the calibrated numerics): verification then runs those
    numerics and reports their own metric."""

    target: str = "ort"
    opset: int | None = None
    batch: int | None = None
    seq_len: int | None = None
    verify: bool = True
    limit: int | None = None
    with_past: bool = False
    force: bool = False
    ort_int8_activations: bool = False
    triton_repo: Path | None = None  # also write a Triton Inference Server model repository there
    fuse: bool = True  # target ort: linears reading one input as one (export/fuse.py), norms fusable (export/norms.py)
    # target ort: onnxruntime's contrib operators where exact: residual + RMSNorm as SkipSimplifiedLayerNormalization
    # (export/norms.py), and with_past attention as GroupQueryAttention (export/attention.py)
    contrib_ops: bool = True
    # with_past GroupQueryAttention graphs: an attention_mask input gives the lengths, so a runtime can keep
    # each layer's cache in one full-length buffer that is past and present at once (export/attention.py)
    kv_in_place: bool = False
    # target ort: lrq's own CPU GEMM (ai.lrq.cpu::MatMulInt4, runtime/cpu_kernels.py) for the 4-bit linears (exact
    # activations, or int8 ones with ort_int8_activations), in the graph as onnxruntime saves it optimized
    # (export/ort_optimized.py)
    cpu_kernels: bool = False
    # keep a graph whose verification fails its tolerance (recorded); by default such an export fails
    allow_outside_tolerance: bool = False
    # a KV cache added at export to a checkpoint calibrated without one: int8 / int4 (dynamic, nothing to calibrate)
    kv_cache: str | None = None

    def __post_init__(self):
        if self.target not in TARGETS:
            raise LrqError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.opset is not None and not 18 <= self.opset <= highest_opset():
            raise LrqError(f"--opset must lie in 18..{highest_opset()} (the highest this onnx and onnxruntime "
                           f"support), got {self.opset}")
        _check_shape_options(self.batch, self.seq_len, self.limit, self.with_past)
        if self.kv_cache not in (None, "int8", "int4"):
            raise LrqError(f"--kv-cache {self.kv_cache} needs static scales measured on calibration data: calibrate "
                           f"with --kv-cache {self.kv_cache} (int8 and int4 caches can be added at export)")
        if self.cpu_kernels and self.target != "ort":
            raise LrqError("--cpu-kernels is lrq's onnxruntime CPU kernel: use it with --target ort")
        if self.cpu_kernels and self.triton_repo is not None:
            raise LrqError("--cpu-kernels graphs need lrq's kernel library, which a Triton model repository does not "
                           "carry: export the repository without --cpu-kernels")
        if self.allow_outside_tolerance and not self.verify:
            raise LrqError("--allow-outside-tolerance keeps a graph that fails verification: drop --no-verify or the option")


def graph_bytes_at_least(checkpoint) -> int | None:
    """A lower bound of the graph's size, from the source's safetensors header: a checkpoint's
    packed codes (every target carries them as they are), or a full-precision model's weights in float32."""
    from lrq_deploy.models.headers import INTEGER_DTYPES, header_bytes, read_file_header, weight_elements

    weights = Path(str(checkpoint)) / "model.safetensors"
    if (Path(str(checkpoint)) / "manifest.json").is_file():
        try:
            return header_bytes(read_file_header(weights), INTEGER_DTYPES)
        except LrqError:
            return None  # the checkpoint's load names what is wrong with it
    elements = weight_elements(str(checkpoint))
    return elements * 4 if elements else None


def highest_opset() -> int:
    """The highest default-domain opset both the installed onnx (checker) and onnxruntime know."""
    from lrq_deploy.runtime.onnxrt import onnxruntime_opset

    return min(onnx.defs.onnx_opset_version(), onnxruntime_opset())


@output_scope()
def export_onnx(checkpoint: Path, out: Path, options: ExportOptions | None = None, **settings) -> dict:
    """Export a checkpoint (or, for a full-precision baseline, a model spec such as bundled:llama)
    to ONNX; returns a report (sizes, and the verification when run). `settings` are
    ExportOptions fields, for callers without an options object.

    The graph is verified before it is moved to `out`: a failed export or verification leaves
    nothing there. The verification results go to OUT.verify.json with the graph's sha256."""
    options = options or ExportOptions(**settings)
    out = Path(out)
    claim_output(out, OUTPUT, options.force, inputs=[checkpoint], option="--onnx",
                 need_bytes=graph_bytes_at_least(checkpoint))
    if options.cpu_kernels:
        from lrq_deploy.runtime.cpu_kernels import preflight

        preflight()
    if options.triton_repo is not None:
        from lrq_deploy.serve.triton import check_repository_target, model_name_for

        check_distinct_outputs({"--onnx": out, "--triton-repo": Path(options.triton_repo) / model_name_for(out)})
        check_repository_target(options.triton_repo, model_name_for(out), options.force, inputs=[checkpoint])
    with step(f"loading {checkpoint}"):
        ckpt = load_source(checkpoint)
    if options.kv_cache:
        ckpt = with_kv_cache(ckpt, options.kv_cache)
    finish = None
    if options.cpu_kernels:
        from lrq_deploy.export.ort_optimized import as_onnxruntime_runs

        finish = lambda graph, graph_report: as_onnxruntime_runs(graph, graph_report, options)  # noqa: E731
    report = export_loaded(ckpt, out, options, finish)
    if options.triton_repo is not None:
        from lrq_deploy.serve.triton import onnx_repository

        report["triton_repo"] = str(onnx_repository(out, options.triton_repo, force=options.force))
    return report


def export_loaded(ckpt, out: Path, options: ExportOptions, finish: Callable[[Path, dict], None] | None = None) -> dict:
    """The graph of a loaded checkpoint (or full-precision source) written, checked and verified
    at `out` (claimed by the caller); finish(graph, report), when given, runs on the written and
    checked graph before its verification (a rewrite of the file in place, such as export/genai.py's)."""
    target, opset, batch, seq_len = options.target, options.opset, options.batch, options.seq_len
    verify, limit, with_past = options.verify, options.limit, options.with_past
    loaded = ckpt.loaded
    if options.ort_int8_activations:
        _check_int8_activations(target, ckpt)
    if options.cpu_kernels:
        _check_cpu_kernel_scheme(ckpt, options.ort_int8_activations)
    for scheme in ckpt.schemes:
        check_float_target(scheme, target)
    quantized_cache = _check_kv_cache(ckpt, target)
    lowest = max([scheme_opset(s, target) for s in ckpt.schemes], default=scheme_opset(None, target))
    if opset is not None and opset < lowest:  # before the trace: known from the schemes
        widths = "/".join(dict.fromkeys(f"W{s.wbits}" for s in ckpt.schemes if scheme_opset(s, target) > opset))
        raise LrqError(f"opset {opset} is too low for {widths} weights with target {target}: the minimum is {lowest}")
    fused_attention = options.contrib_ops and target == "ort" and with_past and not quantized_cache
    layout = loaded.adapter.attention_layout(loaded.model) if fused_attention else None
    cache_layout = _stored_cache_layout(ckpt, options) if quantized_cache else None
    with step("tracing the model (torch.export)"):
        model = trace_to_onnx(loaded, batch, seq_len, with_past, layout, cache_layout)
    needed = required_opset(model, target)
    set_opset(model, max(opset or needed, default_opset(model)))
    fused = fuse_shared_inputs(model) if options.fuse and target == "ort" else 0
    norms = norms_as_division(model) if options.fuse and target == "ort" else 0
    if norms and options.contrib_ops:
        residual_norms_as_contrib(model)
    if layout:
        pack_qkv(model)
    if layout and options.kv_in_place:
        lengths_from_mask(model)
    with step(f"lowering the quantized linears for {target}"):
        lower(model, target)
    drop_debug_records(model)
    describe_graph(model, ckpt, target, with_past)
    if options.allow_outside_tolerance:
        model.metadata_props.add(key=ALLOW_OUTSIDE_TOLERANCE_META, value="true")
    if options.ort_int8_activations:
        model.metadata_props.add(key=ACCURACY_LEVEL_META, value=INT8_ACTIVATIONS_LEVEL)
    report = {"onnx": str(out), "target": target, "opset": default_opset(model), "with_past": with_past,
              "fused_linears": fused, "norms_for_ort": norms,
              "attention": "GroupQueryAttention" if layout else
              "QuantizedCacheAttention (lrq's CPU kernels)" if cache_layout else "standard ops",
              "kv_cache_in_place": bool(layout and options.kv_in_place), **size_report(model, ckpt)}

    def check_and_verify(tmp: Path) -> None:
        try:
            with step("checking the graph (onnx.checker)"):
                onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise LrqError(f"the exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
        if finish is not None:
            finish(tmp, report)
        data = tmp.with_name(tmp.name + ".data")
        report["file_bytes"] = sum(f.stat().st_size for f in (tmp, data) if f.is_file())
        if verify:
            from lrq_deploy.export.verify import verify_against_torch, verify_generation

            with runnable_by_ort(tmp, target) as graph, step("verifying onnxruntime against torch"):
                report["verify"] = verify_against_torch(graph, loaded, limit, with_past, (batch, seq_len),
                                                        any(s.quantize_activations for s in ckpt.schemes))
                check_tolerance(report["verify"], options.allow_outside_tolerance)
                if with_past:
                    report["verify_generation"] = verify_generation(graph, loaded)
        report["sha256"] = sha256_of(tmp)
        if data.is_file():
            report["data_sha256"] = sha256_of(data)

    save_graph(model, out, check_and_verify)
    if "verify" in report:
        write_json(out.with_name(out.name + ".verify.json"), report)
    return report


def check_tolerance(verify: dict, allowed: bool) -> None:
    """A graph outside its tolerance fails the export unless the user keeps it (then it is recorded)."""
    from lrq_deploy.export.verify import verification_line

    verify["allowed_outside_tolerance"] = allowed and not verify["within_tolerance"]
    if not verify["within_tolerance"] and not allowed:
        raise LrqError(f"the graph fails its verification, nothing written: {verification_line(verify)}; "
                       "--allow-outside-tolerance keeps it (recorded in the graph)")


@contextmanager
def runnable_by_ort(graph: Path, target: str):
    """The graph itself (target ort), or for target trt the same graph with its lrq plugin nodes
    rewritten into the standard ops onnxruntime runs (lower_trt.ort_reference, from the nodes' own
    bytes), in a temporary file beside it: a TensorRT graph is verified against torch too."""
    if target == "ort":
        yield graph
        return
    from lrq_deploy.export.lower_trt import ort_reference

    reference = graph.with_name(graph.name + ".ort-reference.onnx")
    try:
        onnx.save(ort_reference(onnx.load(str(graph))), str(reference))
        yield reference
    finally:
        reference.unlink(missing_ok=True)


def save_graph(model: onnx.ModelProto, out: Path, check: Callable[[Path], None]) -> None:
    """Write the graph, run check(path) on the written copy, then move it to `out`.

    Graphs whose weights pass protobuf's 2 GiB limit keep them in OUT.data beside OUT (ONNX
    external data, one file; onnxruntime and TensorRT read it from there): both files are
    written and checked in a temporary directory first."""
    if sum(len(t.raw_data) for t in model.graph.initializer) < INLINE_LIMIT:
        atomic_write(out, lambda tmp: (onnx.save(model, str(tmp)), check(tmp)))
        return
    remove_stale_temporaries(out)
    staging = temporary_path(out, "-dir")
    staging.mkdir()
    try:
        inner, data = staging / out.name, out.name + ".data"
        _mark_external(model, data)
        onnx.save(model, str(inner))  # writes the marked tensors to staging/data
        check(inner)
        make_readable(staging)
        os.replace(staging / data, out.with_name(data))
        os.replace(inner, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _mark_external(model: onnx.ModelProto, location: str, threshold: int = 1024) -> None:
    """Mark every initializer of at least `threshold` bytes to go to `location` (one file beside the
    graph). onnx's own save_as_external_data refuses when a file named `location` exists in the
    current directory (not the graph's), which an earlier export run from there leaves."""
    from onnx.external_data_helper import set_external_data

    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
            set_external_data(tensor, location)


def _check_cpu_kernel_scheme(ckpt, int8_activations: bool) -> None:
    """Before the trace: a scheme none of whose linears lrq's CPU kernel serves (ort_optimized._as_lrq_kernel)."""
    from lrq_deploy.export.ort_optimized import BLOCK_MULTIPLE, INT8_BLOCK_MULTIPLE

    multiple = INT8_BLOCK_MULTIPLE if int8_activations else BLOCK_MULTIPLE

    def unfit(quant) -> str | None:
        return ("the model is full precision" if not quant or not quant.quantize_weights else
                f"its weights are {quant.name}, not 4-bit integers" if quant.wbits != 4 or quant.float_format else
                "its activations are quantized (the kernel takes float activations)" if quant.quantize_activations else
                f"its group size {quant.group_size} is not a multiple of {multiple}"
                if quant.group_size and quant.group_size % multiple else None)

    reasons = [unfit(scheme) for scheme in ckpt.schemes] or [unfit(None)]
    why = None if None in reasons else reasons[0]
    if why:
        raise LrqError(f"--cpu-kernels: no linear of this graph fits lrq's CPU kernel ({why}; it takes 4-bit weights in "
                       f"blocks of a multiple of 32, of 128 with --ort-int8-activations)")


def _check_int8_activations(target: str, ckpt) -> None:
    if target != "ort" or not ckpt.schemes or any((s.wbits, s.abits) != (4, 16) or not s.group_size
                                                   for s in ckpt.schemes):
        raise LrqError("--ort-int8-activations applies to group-wise W4A16 checkpoints exported with --target ort "
                       "(onnxruntime's MatMulNBits)")


def with_kv_cache(ckpt, fmt: str):
    """The checkpoint with an int8 / int4 KV cache (per token and head, dynamic: nothing to calibrate)
    its graphs keep, recorded in its scheme as if calibrated with it; one line where it cannot take one."""
    from dataclasses import replace

    from lrq_deploy.quant.kv_cache import quantize_kv_cache

    if ckpt.quant is None:
        raise LrqError(f"--kv-cache {fmt} on export applies to lrq checkpoints; {ckpt.source} is a full-precision "
                       f"model: calibrate it (lrq calibrate --kv-cache {fmt})")
    have = ckpt.quant.kv_cache
    if have == fmt:
        return ckpt
    if have != "none":
        raise LrqError(f"--kv-cache {fmt}: this checkpoint was calibrated with the {have} KV cache, which its graphs "
                       "keep; export it without --kv-cache")
    quantize_kv_cache(ckpt.adapter, ckpt.model, fmt)
    quant = replace(ckpt.quant, kv_cache=fmt)
    return replace(ckpt, quant=quant, manifest={**ckpt.manifest, "quant": quant.to_dict()})


def _check_kv_cache(ckpt, target: str) -> bool:
    """Graphs carry a quantized KV cache as the reference's ops: each new key and value quantized
    once; graphs with a cache keep it as codes, scales and zero points (standard-op attention).
    Refused in one line where a graph cannot hold it yet."""
    fmt = ckpt.quant.kv_cache if ckpt.quant is not None else "none"
    if fmt == "none":
        return False
    if target != "ort":
        raise LrqError(f"--target {target} graphs cannot carry the {fmt} KV cache yet; use --target ort, or calibrate "
                       "without --kv-cache")
    return True


def _stored_cache_layout(ckpt, options):
    """With --cpu-kernels and --with-past: the attention layout whose modules read an int8 / int4 / fp8
    cache through lrq's QuantizedCacheAttention (None: standard-op attention)."""
    from lrq_deploy.export.kv_attention import supports

    if not (options.cpu_kernels and options.with_past and options.target == "ort"):
        return None
    layout = ckpt.loaded.adapter.attention_layout(ckpt.loaded.model)
    return layout if supports(layout, ckpt.quant.kv_cache) else None


def _check_shape_options(batch, seq_len, limit, with_past) -> None:
    if batch is not None and batch < 1:
        raise LrqError(f"--batch must be >= 1, got {batch}")
    if seq_len is not None and seq_len < 1:
        raise LrqError(f"--seq-len must be >= 1, got {seq_len}")
    if limit is not None and limit < 1:
        raise LrqError(f"--limit must be >= 1, got {limit}")
    if with_past and (batch is not None or seq_len is not None):
        raise LrqError("--with-past graphs keep dynamic batch and sequence axes (prefill and decode); drop --batch/--seq-len")


def _is_lrq_graph(path: Path) -> bool:
    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "lrq-deploy"
    except Exception:  # not an ONNX file at all
        return False


OUTPUT = OutputKind("ONNX graph", directory=False, recognise=_is_lrq_graph)


def drop_debug_records(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records (stack traces naming the exporting machine's
    source paths, FX node text): the graph then depends only on the checkpoint and the options,
    the same bytes wherever lrq-deploy is installed, and carries no local paths."""
    for node in model.graph.node:
        del node.metadata_props[:]


def describe_graph(model: onnx.ModelProto, ckpt, target: str, with_past: bool) -> None:
    """Record what the graph is in its metadata (read back by `lrq info`)."""
    from lrq_deploy.provenance import library_versions

    versions = library_versions()
    weights = ckpt.manifest.get("files", {}).get("model.safetensors", {})
    loaded = ckpt.loaded
    fields = {
        "lrq.format": GRAPH_FORMAT, "lrq.family": loaded.adapter.family, "lrq.target": target,
        "lrq.scheme": ckpt.scheme_name,
        "lrq.symmetric": str(bool(ckpt.quant and ckpt.quant.symmetric)), "lrq.method": ckpt.method,
        "lrq.with_past": str(with_past), "lrq.source": str(loaded.spec),
        "lrq.max_seq_len": str(loaded.adapter.max_sequence_length(loaded.model) or ""),
        "lrq.source_weights_sha256": weights.get("sha256", ""),
        "lrq.versions": json.dumps({**versions, "onnx": onnx.__version__}),
    }
    rotation = ckpt.manifest.get("rotation")
    if rotation:  # the transforms themselves are graph nodes; this says where they came from
        fields["lrq.rotation"] = json.dumps({k: rotation[k] for k in ("kind", "seed", "online") if k in rotation})
    model.producer_name, model.producer_version = "lrq-deploy", versions.get("lrq-deploy", "")
    fields.update({p.key: p.value for p in model.metadata_props if p.key == FLOAT_LAYERS_KEY})  # lowering's record
    del model.metadata_props[:]
    for key, value in fields.items():
        model.metadata_props.add(key=key, value=value)


def trace_to_onnx(loaded, batch: int | None, seq_len: int | None, with_past: bool = False,
                  attention_layout=None, stored_cache_layout=None) -> onnx.ModelProto:
    """torch.export the reference model with every QuantLinear as one lrq.QuantLinear node (and,
    given an attention layout, every attention as one GroupQueryAttention node; given a stored-cache
    layout, every attention over a quantized cache as one QuantizedCacheAttention node)."""
    from contextlib import nullcontext

    from lrq_deploy.export.attention import group_query_attention_modules
    from lrq_deploy.export.kv_attention import quantized_cache_attention_modules
    from lrq_deploy.quant.kv_cache import cache_format

    spec = loaded.adapter.export_spec(loaded.model, batch, seq_len, with_past)
    graph_ops(loaded.model, True)
    fused = group_query_attention_modules(attention_layout) if attention_layout else (
        quantized_cache_attention_modules(stored_cache_layout, cache_format(loaded.model)) if stored_cache_layout
        else nullcontext())
    try:
        with torch.no_grad(), warnings.catch_warnings(), fused:
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            program = torch.onnx.export(
                spec.module.eval(), spec.example_args, dynamo=True, dynamic_shapes=spec.dynamic_shapes,
                custom_translation_table=TRANSLATIONS, input_names=spec.input_names,
                output_names=spec.output_names, optimize=True, verbose=False,
            )
    finally:
        graph_ops(loaded.model, False)
    return program.model_proto


def graph_ops(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.graph_op = enabled


def size_report(model: onnx.ModelProto, ckpt) -> dict:
    """Bytes of the quantized linears' weights (codes + scales + zero points) vs the same weights in FP16."""
    quant_names = set(ckpt.quantized_modules)
    init_bytes = {t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    plugin_inputs = {name for n in model.graph.node if n.domain == DOMAIN for name in n.input[1:4]}
    quant_bytes = sum(b for n, b in init_bytes.items() if n.startswith("lrq_linear_") or n in plugin_inputs)
    fp16 = _fp16_linear_bytes(model)
    return {
        "quantized_linears": len(quant_names),
        "quantized_weight_bytes": quant_bytes,
        "fp16_weight_bytes": fp16,
        "weight_ratio": quant_bytes / fp16 if fp16 else None,
    }


def _fp16_linear_bytes(model: onnx.ModelProto) -> int:
    """Bytes the quantized linears' weights would take in FP16, from the weight tensor each
    lowered pattern consumes (DequantizeLinear data, MatMulInteger codes, or a plugin's shape)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = producers(model)
    total = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == DOMAIN and "out_features" in attrs:
            total += attrs["in_features"] * attrs["out_features"] * 2
            continue
        if not node.name.startswith("lrq_linear_") or node.op_type not in ("DequantizeLinear", "MatMulInteger", "MatMul"):
            continue
        weight = node.input[0] if node.op_type == "DequantizeLinear" else node.input[1]
        if weight in producer and producer[weight].op_type == "Cast":  # UINT4 codes cast to UINT8
            weight = producer[weight].input[0]
        if weight in inits and (node.op_type != "MatMul" or weight.endswith("weight_t")):
            total += int(np.prod(inits[weight].dims)) * 2
    return total
