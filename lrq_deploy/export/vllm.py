"""`lrq export CKPT --vllm DIR`: a Hugging Face checkpoint in the compressed-tensors format,
which vLLM serves and transformers loads (compressed-tensors decompression on CPU).

The compressed-tensors library does the packing: the quantized linears are rebuilt as float
linears holding exactly the dequantized weights, given the checkpoint's scales and zero points
as frozen quantization parameters, and compressed; the codes it packs are the checkpoint's
codes (w / s is an exact small integer). Weight zero points move from our unsigned codes
[0, 2^b) to the format's signed ones (minus 2^(b-1)); scales are kept in float32, where every
float16 scale is exact. Float grids take compressed-tensors' float schemes: FP8 (per-channel
E4M3 weights, static per-tensor E4M3 inputs, "float-quantized") and NVFP4 (E2M1 in blocks of 16
with E4M3 block scales, "nvfp4-pack-quantized"; its global scales are the reciprocals of lrq's
power-of-two tensor scales, so exact). An FP8 KV cache becomes the config's kv_cache_scheme (static
per-tensor E4M3) with each attention layer's calibrated `k_scale` / `v_scale` (the same
convention: the cache holds key / k_scale in E4M3), which vLLM reads. Before the directory is moved into place it is loaded back with
transformers and every quantized weight is compared with the checkpoint's, bit for bit.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lrq_deploy.atomic import OutputKind, atomic_directory, claim_output, is_json_of, output_scope, write_json
from lrq_deploy.errors import LrqError

INSTALL_HINT = 'pip install "lrq-deploy[serve]"'
SUPPORTED = ("weight-only W4A16 / W8A16 (per channel or group, symmetric or asymmetric), W8A8, FP8 (W8A8, W8A16) and "
             "NVFP4 (W4A4, W4A16)")
MARKER, MARKER_FORMAT = "lrq-export.json", "lrq-vllm/1"  # says lrq wrote the directory (--force may replace it)
OUTPUT = OutputKind("vLLM export", directory=True, recognise=lambda p: is_json_of(Path(p) / MARKER, "format", MARKER_FORMAT))


@output_scope()
def export_vllm(checkpoint: Path, out: Path, force: bool = False) -> dict:
    """Write `out` (config.json with quantization_config, model.safetensors, tokenizer)."""
    from lrq_deploy.checkpoint import load_checkpoint

    out = Path(out)
    claim_output(out, OUTPUT, force, inputs=[checkpoint], option="--vllm")
    ckpt = load_checkpoint(Path(checkpoint))
    _check_supported(ckpt)
    _require_library()
    model, expected = _float_linears(ckpt)
    kv_scales = _kv_scales(model)
    result = {}

    def write(staging: Path) -> None:
        with _quiet():
            compressor = _attach_qparams(model, ckpt, expected, kv_scales)
            compressor.compress_model(model)
            model.save_pretrained(staging, safe_serialization=True)
            compressor.update_config(str(staging))
            if ckpt.loaded.tokenizer is not None:
                ckpt.loaded.tokenizer.save_pretrained(staging)
            _check_round_trip(staging, expected)
            _check_kv_scales(staging, kv_scales)
        result["format"] = compressor.quantization_config.format
        write_json(staging / MARKER, {"format": MARKER_FORMAT, "source": str(Path(checkpoint).resolve()),
                                      "scheme": ckpt.scheme_name, "method": ckpt.method})

    atomic_directory(out, write)
    return {"vllm": str(out), "format": result["format"], "scheme": ckpt.scheme_name,
            "quantized_linears": len(expected), "kv_cache": ckpt.quant.kv_cache}


@contextmanager
def _quiet():
    """compressed-tensors and transformers draw progress bars and print notes on stderr; the
    command prints its own one-line summary (errors still surface as exceptions)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the activation scales decompression drops
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


# The linears vLLM packs into one layer (its models' packed_modules_mapping): one scheme for all of them.
VLLM_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _check_supported(ckpt) -> None:
    if ckpt.adapter.task != "causal_lm":
        raise LrqError(f"--vllm exports causal language models; this checkpoint is a {ckpt.adapter.task} model")
    if ckpt.adapter.restructures:
        raise LrqError(f"--vllm does not serve {ckpt.adapter.family} checkpoints yet (lrq keeps their experts as "
                       "one linear pair per expert; vLLM loads the fused layout); use --onnx or --genai")
    if (ckpt.manifest or {}).get("rotation", {}).get("online"):
        raise LrqError("--vllm cannot carry lrq's online rotation before down_proj (vLLM would run the linear on the "
                       "unrotated input); calibrate without --rotate, or use --onnx / --genai")
    if ckpt.quant is None:
        raise LrqError(f"--vllm cannot express a full-precision model: compressed-tensors checkpoints support {SUPPORTED}")
    for quant in ckpt.schemes:
        if quant.float_format == "mxfp4":
            raise LrqError(f"--vllm cannot express {quant.name}: lrq's MXFP4 has no compressed-tensors form it writes "
                           f"yet (compressed-tensors checkpoints support {SUPPORTED}); use --onnx")
        if (quant.wbits, quant.abits) not in ((4, 16), (8, 16), (8, 8), (4, 4)) or (
                quant.abits == 4 and quant.float_format != "nvfp4"):
            raise LrqError(f"--vllm cannot express {quant.name}: compressed-tensors checkpoints support {SUPPORTED}")
    if ckpt.quant.kv_rotate:
        raise LrqError("--vllm cannot carry rotated keys (--kv-rotate): vLLM's FP8 cache reads keys as the model "
                       "computes them; calibrate without --kv-rotate, or export with --onnx --with-past")
    if ckpt.quant.kv_cache not in ("none", "fp8"):
        raise LrqError(f"--vllm cannot carry an {ckpt.quant.kv_cache} KV cache: vLLM reads a static FP8 cache only "
                       f"(k_scale / v_scale); calibrate with --kv-cache fp8, or export this cache with --onnx --with-past")
    _check_packed_alike(ckpt)


def _check_packed_alike(ckpt) -> None:
    """vLLM runs q/k/v (gate/up) as one packed layer: per-layer schemes must give its parts one scheme."""
    from lrq_deploy.checkpoint import module_scheme

    quantized = set(ckpt.quantized_modules)
    for parent in {name.rpartition(".")[0] for name in quantized}:
        for packed, parts in VLLM_PACKED.items():
            siblings = [f"{parent}.{p}" for p in parts if _has_module(ckpt.model, f"{parent}.{p}")]
            schemes = {module_scheme(ckpt.manifest, s).name if s in quantized else "none" for s in siblings}
            if len(schemes) > 1:
                raise LrqError(f"--vllm: vLLM runs {', '.join(parts)} of {parent} as one layer ({packed}), but they have "
                               f"the schemes {', '.join(sorted(schemes))}; give them one scheme")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _require_library() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LrqError(f"--vllm needs the compressed-tensors package: {INSTALL_HINT}") from None


def _float_linears(ckpt) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, nn.Module]]]:
    """The model with every QuantLinear replaced by an nn.Linear holding its dequantized weight;
    returns it and {name: (expected weight, the QuantLinear)}."""
    from lrq_deploy.quant import QuantLinear

    model = ckpt.model
    expected = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            expected[name] = (linear.weight.detach().clone(), module)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model, expected


def _kv_scales(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{attention module: (k_scale, v_scale)} of an FP8 cache, its quantizers taken off the model
    (compressed-tensors attaches its own)."""
    from lrq_deploy.quant.kv_cache import detach_kv_quantizers

    return {name: (q.k_scale.detach().float().clone(), q.v_scale.detach().float().clone())
            for name, q in detach_kv_quantizers(model).items() if q.fmt == "fp8"}


def _kv_cache_args():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)


def _attach_qparams(model: nn.Module, ckpt, expected: dict, kv_scales: dict):
    """The compressed-tensors scheme of the checkpoint, with its scales and zero points (and the
    FP8 cache's k_scale / v_scale) frozen in."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config,
    )

    by_scheme: dict = {}
    for name, (_, source) in expected.items():
        by_scheme.setdefault(source.config, []).append(name)
    groups, formats = {}, []
    for index, (quant, names) in enumerate(by_scheme.items()):
        weights, activations, fmt = _float_args(quant) if quant.float_format else _int_args(quant)
        targets = ["Linear"] if len(by_scheme) == 1 else names  # per-layer schemes: each group names its modules
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=weights, input_activations=activations,
                                                      format=fmt)
        formats.append(fmt)
    fmt = formats[0] if len(set(formats)) == 1 else None  # None: each group keeps its own ("mixed-precision")
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in expected]
    config = QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.FROZEN,
                                format=fmt or "mixed-precision", kv_cache_scheme=_kv_cache_args() if kv_scales else None)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name, (_, source) in expected.items():
            for param, value in _qparams(source).items():
                target = getattr(model.get_submodule(name), param)
                target.copy_(value.to(target.dtype).view_as(target))
        for name, scales in kv_scales.items():
            _set_kv_scales(model.get_submodule(name), scales)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    if kv_scales:
        compressor.quantization_config.kv_cache_scheme = _kv_cache_args()
    return compressor


def _set_kv_scales(attention: nn.Module, scales: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`k_scale` / `v_scale` of one attention module, shape (1,) as compressed-tensors writes them
    (registered here where the library does not recognise the module's cache argument)."""
    for param, value in zip(("k_scale", "v_scale"), scales):
        target = getattr(attention, param, None)
        if target is None:
            attention.register_parameter(param, nn.Parameter(value.reshape(1).clone(), requires_grad=False))
        else:
            target.copy_(value.to(target.dtype).view_as(target))


def _int_args(quant):
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=quant.wbits, type="int", symmetric=quant.symmetric,
                               strategy="group" if quant.group_size else "channel", group_size=quant.group_size)
    activations = (QuantizationArgs(num_bits=8, type="int", symmetric=not quant.act_asym, strategy="token", dynamic=True)
                   if quant.abits == 8 else None)
    return weights, activations, "int-quantized" if activations else "pack-quantized"


def _float_args(quant):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import NVFP4

    if quant.float_format == "nvfp4":
        return NVFP4["weights"], NVFP4["input_activations"] if quant.quantize_activations else None, "nvfp4-pack-quantized"
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    activations = (QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
                   if quant.quantize_activations else None)
    return weights, activations, "float-quantized"


def _qparams(source) -> dict[str, torch.Tensor]:
    """The compressed-tensors parameters of one QuantLinear (names as the scheme registers them)."""
    quant = source.config
    if not quant.float_format:
        params = {"weight_scale": source.scales.float()}
        if not quant.symmetric:
            params["weight_zero_point"] = source.zeros.to(torch.int16) - 2 ** (quant.wbits - 1)
        return params
    if quant.float_format == "fp8":
        params = {"weight_scale": source.scales.float()}
        if quant.quantize_activations:
            params["input_scale"] = source.tensor_scales[1:]
        return params
    from lrq_deploy.quant.floats import E4M3, decode

    params = {"weight_scale": decode(source.scales, E4M3), "weight_global_scale": 1 / source.tensor_scales[:1]}
    if quant.quantize_activations:
        params["input_global_scale"] = 1 / source.tensor_scales[1:]
    return params


def load_decompressed(path: Path) -> nn.Module:
    """The exported model through transformers, decompressed to float linears on CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def decompressed_weights(path: Path, names) -> dict[str, torch.Tensor]:
    """Each named linear's weight as compressed-tensors decompresses it with the config group whose targets
    match the module, as vLLM picks a layer's scheme. (transformers decompresses every dense layer with one
    group's scheme, so a checkpoint with per-layer schemes is checked here, not through transformers.)"""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from safetensors import safe_open

    config = QuantizationConfig.model_validate(json.loads((Path(path) / "config.json").read_text())["quantization_config"])
    weights = {}
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        for name in names:
            scheme = next(s for s in config.config_groups.values() if any(match_name(name, t) for t in s.targets))
            state = {k[len(name) + 1:]: handle.get_tensor(k) for k in keys if k.startswith(name + ".")}
            compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
            weights[name] = compressor.decompress(state, scheme)["weight"].float()
    return weights


def _check_kv_scales(path: Path, kv_scales: dict) -> None:
    """Every attention layer's k_scale / v_scale in the written file equal the checkpoint's."""
    from safetensors import safe_open

    if not kv_scales:
        return
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        for name, scales in kv_scales.items():
            for param, value in zip(("k_scale", "v_scale"), scales):
                key = f"{name}.{param}"
                if key not in keys or not torch.equal(handle.get_tensor(key).float().reshape(()), value.reshape(())):
                    raise LrqError(f"the compressed-tensors export does not hold the checkpoint's {key}; nothing written")


def _check_round_trip(path: Path, expected: dict) -> None:
    mixed = len({source.config for _, source in expected.values()}) > 1
    if mixed:
        got_weights = decompressed_weights(path, expected)
    else:
        model = load_decompressed(path)
        got_weights = {name: model.get_submodule(name).weight.detach().float() for name in expected}
    for name, (weight, _) in expected.items():
        got = got_weights[name]
        if not torch.equal(got, weight):
            raise LrqError(f"the compressed-tensors export of {name} does not decompress to the checkpoint's weight "
                           f"(max difference {(got - weight).abs().max().item():.3g}); nothing written")
