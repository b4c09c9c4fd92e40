"""A quantized KV cache: what attention stores of each key and value, and the reference arithmetic.

Formats (QuantScheme.kv_cache):
- int8 / int4: per token and key/value head, asymmetric over the head dimension, dynamic (each
  token's [min, max] with a zero point; quant/primitives.py's per-token activation arithmetic):
  codes uint8 (int4: two per byte along the head dimension), one scale and one zero point per
  token and head. Nothing is calibrated.
- fp8: E4M3 with one static scale per layer for the keys and one for the values (amax / 448 over
  the calibration set), the k_scale / v_scale form vLLM and TensorRT-LLM read.

Keys are quantized after the rotary embedding, as the cache holds them. A token is quantized once,
when it is appended; attention then reads the dequantized cache for every token, the new ones
included, so prefill and decode see the same numbers.

In torch each cached attention module carries a KVCacheQuantizer (`kv_quant`) and a forward
pre-hook that hands the module a cache which quantizes what it is given before storing it: the
model's own cache when there is one (generation, `--with-past` tracing), else a stateless one
(calibration blocks, perplexity), so every path computes with the same quantized keys and values.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.floats import E4M3, decode_by_table, encode_by_comparison, fake_quant_fp8, fp8_scale_of
from lrq_deploy.quant.primitives import quantize_activation_asym, sylvester_hadamard
from lrq_deploy.quant.scheme import check_kv_format

KV_BITS = {"int8": 8, "int4": 4, "fp8": 8}
QUANTIZER = "kv_quant"  # the submodule of each cached attention module
DESCRIPTIONS = {"none": "float (not quantized)",
                "int8": "int8 codes, per token and head asymmetric (scale + zero point), dynamic",
                "int4": "int4 codes, per token and head asymmetric (scale + zero point), dynamic",
                "fp8": "FP8 E4M3, one static scale per layer for keys and one for values (calibrated)"}


def quantize_kv(x: torch.Tensor, fmt: str, scale: torch.Tensor | None = None):
    """The stored form of keys or values x [..., head_dim]: int8 / int4 -> (codes uint8 unpacked,
    scale [..., 1] float32, zero [..., 1] uint8); fp8 -> (E4M3 bit patterns uint8, the static scale)."""
    if fmt == "fp8":
        return encode_by_comparison(x.float() / scale, E4M3), scale  # the form graphs carry, bit-equal to encode()
    codes, step, zero = quantize_activation_asym(x.float(), KV_BITS[fmt])
    return codes.to(torch.uint8), step, zero.to(torch.uint8)


def dequantize_kv(stored: tuple, fmt: str) -> torch.Tensor:
    if fmt == "fp8":
        codes, scale = stored
        return decode_by_table(codes, E4M3) * scale
    codes, step, zero = stored
    return (codes.float() - zero.float()) * step


def fake_quant_kv(x: torch.Tensor, fmt: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(x)) with gradients straight through the rounding (learnable methods
    train with the quantized cache in the block's loss)."""
    if fmt == "fp8":
        return fake_quant_fp8(x, scale).to(x.dtype)
    codes, step, zero = quantize_activation_asym(x, KV_BITS[fmt])
    return ((codes - zero) * step).to(x.dtype)


def kv_bytes_per_token(fmt: str, layers: int, kv_heads: int, head_dim: int) -> float:
    """Bytes one token adds to the cache of the whole model (keys and values; scales and zero
    points in float32 / uint8 as stored)."""
    per_head = {"none": 4 * head_dim, "int8": head_dim + 4 + 1, "int4": head_dim / 2 + 4 + 1,
                "fp8": head_dim}[fmt]
    return 2 * layers * kv_heads * per_head


class KVCacheQuantizer(nn.Module):
    """The cache format of one attention module; fp8 keeps its static k_scale / v_scale (buffers,
    saved with the checkpoint). `observing` collects amax instead of quantizing (scale calibration);
    `enabled` False passes keys and values through (the full-precision reference of a block)."""

    def __init__(self, fmt: str, rotation: torch.Tensor | None = None):
        super().__init__()
        check_kv_format(fmt)
        self.fmt = fmt
        # keys are quantized as key @ rotation (orthonormal, symmetric: its own inverse) and read back
        # as dequantized @ rotation; rebuilt from the head size, so not saved
        self.register_buffer("rotation", rotation, persistent=False)
        self.enabled = True
        self.observing = False
        if fmt == "fp8":
            self.register_buffer("k_scale", torch.ones(()))
            self.register_buffer("v_scale", torch.ones(()))
        self._amax = [torch.zeros(()), torch.zeros(())]
        self.recorded: list | None = None  # while a graph with a cache is traced: the stored forms appended
        # while a graph whose attention reads the stored cache is traced (export/kv_attention.py):
        # this layer's past in its stored form, and the present the attention computed with
        self.stored_past: list | None = None
        self.stored_present: list | None = None

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return key, value
        key = self.rotate(key)
        if self.recorded is not None:  # the stored form itself, dequantized as attention reads it (the same values)
            stored = [quantize_kv(t, self.fmt, getattr(self, s, None)) for t, s in ((key, "k_scale"), (value, "v_scale"))]
            self.recorded.append(stored)
            key, value = (dequantize_kv(x, self.fmt).to(t.dtype) for x, t in zip(stored, (key, value)))
        elif self.observing:
            self._amax = [torch.maximum(a.to(t.device), t.detach().abs().amax().float())
                          for a, t in zip(self._amax, (key, value))]
        elif self.fmt == "fp8":
            key, value = fake_quant_kv(key, "fp8", self.k_scale), fake_quant_kv(value, "fp8", self.v_scale)
        else:
            key, value = fake_quant_kv(key, self.fmt), fake_quant_kv(value, self.fmt)
        return self.rotate(key), value

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x @ rotation (no-op without one); applied twice it gives x back."""
        return x if self.rotation is None else (x.float() @ self.rotation).to(x.dtype)

    def finish_observing(self, reduce=lambda amax: amax) -> None:
        """Fix the static scales from what was observed (fp8; `reduce`: the largest over the calibration
        ranks), and quantize from now on."""
        self.observing = False
        self._amax = [reduce(a) for a in self._amax]
        if self.fmt == "fp8":
            self.k_scale.copy_(fp8_scale_of(self._amax[0]).to(self.k_scale))
            self.v_scale.copy_(fp8_scale_of(self._amax[1]).to(self.v_scale))

    def extra_repr(self) -> str:
        return self.fmt


class _QuantizingCache:
    """What a cached attention module calls `cache.update` on: quantizes the new keys and values,
    then stores them in the model's cache (when there is one) and returns what attention reads."""

    def __init__(self, quantizer: KVCacheQuantizer, inner):
        self.quantizer, self.inner = quantizer, inner

    def update(self, key, value, layer_idx, *args, **kwargs):
        key, value = self.quantizer(key, value)
        if self.inner is None:
            return key, value
        return self.inner.update(key, value, layer_idx, *args, **kwargs)

    def __getattr__(self, name):
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _quantizing_hook(module, args, kwargs):
    quantizer = getattr(module, QUANTIZER)
    given = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    inner = kwargs.pop(given) if given else None
    for name in CACHE_KWARGS:
        kwargs.pop(name, None)
    kwargs["cache"] = _QuantizingCache(quantizer, inner)
    return args, kwargs


def key_rotation(head_dim: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of the head size (Sylvester's construction: symmetric, so its
    own inverse), float32."""
    return (sylvester_hadamard(head_dim) / head_dim ** 0.5).float()


def attach_kv_quantizers(modules: list[nn.Module], fmt: str, rotation: torch.Tensor | None = None
                         ) -> list[KVCacheQuantizer]:
    """Give each cached attention module a quantizer and the pre-hook that applies it."""
    quantizers = []
    for module in modules:
        quantizer = KVCacheQuantizer(fmt, None if rotation is None else rotation.clone())
        module.add_module(QUANTIZER, quantizer)
        module.register_forward_pre_hook(_quantizing_hook, with_kwargs=True)
        quantizers.append(quantizer)
    return quantizers


def quantize_kv_cache(adapter, model: nn.Module, fmt: str, rotate_keys: bool = False) -> list[KVCacheQuantizer]:
    """Quantize the KV cache of a model in `fmt` (nothing for "none"), keys rotated first where
    `rotate_keys`; one line where the family keeps no cache lrq can quantize or the format cannot
    store its heads."""
    if fmt == "none":
        return []
    modules = adapter.cached_attention(model)
    if not modules:
        raise LrqError(f"--kv-cache {fmt}: {adapter.family} models keep no KV cache lrq can quantize "
                       "(decoder language models do)")
    _, head_dim = adapter.kv_cache_shape(model.config)
    if fmt == "int4" and head_dim % 2:
        raise LrqError(f"--kv-cache int4 packs two codes per byte along the head dimension; this model's heads "
                       f"have {head_dim} dimensions (odd): use --kv-cache int8 or fp8")
    if rotate_keys and head_dim & (head_dim - 1):
        raise LrqError(f"--kv-rotate needs a Hadamard matrix of the head size; this model's heads have {head_dim} "
                       "dimensions (not a power of two): calibrate without --kv-rotate")
    return attach_kv_quantizers(modules, fmt, key_rotation(head_dim) if rotate_keys else None)


def kv_quantizers(module: nn.Module) -> list[KVCacheQuantizer]:
    return [m for m in module.modules() if isinstance(m, KVCacheQuantizer)]


def cache_format(model: nn.Module) -> str:
    """The KV-cache format a model computes with ("none" without quantizers)."""
    return next((q.fmt for q in kv_quantizers(model)), "none")


# --- the cache as graphs keep it: per layer and kind, codes then (int) scale and zero point -----

def stored_specs(fmt: str, head_dim: int) -> list[tuple[str, str, int]]:
    """(name suffix, dtype, last dimension) of each tensor one layer's keys (or values) are kept in:
    int8 / int4 codes, scale and zero point per token; fp8 the E4M3 codes alone (its scale is static)."""
    if fmt == "fp8":
        return [("", "uint8", head_dim)]
    width = head_dim // 2 if fmt == "int4" else head_dim
    return [("", "uint8", width), ("_scale", "float32", 1), ("_zero", "uint8", 1)]


def pack_stored(stored: tuple, fmt: str) -> tuple:
    """int4: two codes per byte along the head dimension (even index in the low nibble); fp8: the codes
    (the static scale is a constant of the graph, not part of the cache)."""
    if fmt == "fp8":
        return (stored[0],)
    if fmt != "int4":
        return tuple(stored)
    codes, *rest = stored
    wide = codes.to(torch.int32)  # integer arithmetic in int32: what every onnxruntime kernel takes
    return ((wide[..., 0::2] + wide[..., 1::2] * 16).to(torch.uint8), *rest)


def unpack_stored(stored: tuple, fmt: str, scale: torch.Tensor | None = None) -> tuple:
    """What dequantize_kv reads; fp8 takes its static `scale` back."""
    if fmt == "fp8":
        return (stored[0], scale)
    if fmt != "int4":
        return tuple(stored)
    packed, *rest = stored
    wide = packed.to(torch.int32)
    codes = torch.stack([wide % 16, wide // 16], -1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return (codes.to(torch.uint8), *rest)


def detach_kv_quantizers(model: nn.Module) -> dict[str, KVCacheQuantizer]:
    """Remove every cache quantizer and its hook (a model handed to another runtime's format);
    returns {attention module name: its quantizer}."""
    detached = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, QUANTIZER, None)
        if isinstance(quantizer, KVCacheQuantizer):
            del module._modules[QUANTIZER]
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _quantizing_hook:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
            detached[name] = quantizer
    return detached


@contextmanager
def recording_stored_forms(model: nn.Module):
    """Inside: each quantizer appends the stored form of what it quantizes to its `recorded` list."""
    quantizers = kv_quantizers(model)
    for q in quantizers:
        q.recorded = []
    try:
        yield quantizers
    finally:
        for q in quantizers:
            q.recorded = None


@contextmanager
def kv_quantization_off(module: nn.Module):
    """Inside: the cache quantizers under `module` pass keys and values through."""
    quantizers = kv_quantizers(module)
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q in quantizers:
            q.enabled = True


@torch.no_grad()
def calibrate_kv_scales(module: nn.Module, run, reduce=lambda amax: amax) -> None:
    """Static scales (fp8) of the quantizers under `module` from the amax of what `run()` feeds them
    (`reduce`: the largest over the calibration ranks)."""
    quantizers = [q for q in kv_quantizers(module) if q.fmt == "fp8"]
    if not quantizers:
        return
    for q in quantizers:
        q.observing = True
    try:
        run()
    finally:
        for q in quantizers:
            q.finish_observing(reduce)
