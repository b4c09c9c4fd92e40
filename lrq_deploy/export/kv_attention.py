"""Attention of `--with-past --cpu-kernels` graphs over an int8 / int4 / fp8 KV cache as one
ai.lrq.cpu::QuantizedCacheAttention node (runtime/csrc/kv_attention.cc): attention reads the
cache's codes, scales and zero points as they are stored, instead of a float copy of the whole
cache that standard ops would write out every token.

During the trace each attention module of the adapter's layout (ModelAdapter.attention_layout)
runs: projections, rotary embedding at the positions after the past, quantization of the new
tokens' keys and values (once, by the module's cache quantizer), their stored form appended to
the past's, and the op `lrq::quantized_cache_attention` on the query and the whole stored cache.
The op's eager body is the reference (the cache dequantized, causal grouped-query attention); its
ONNX form is the one node. The present stored cache is left on the quantizer for the graph's
outputs (models/causal_lm.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lrq_deploy.export.attention import rotate_half
from lrq_deploy.models.attention import AttentionLayout
from lrq_deploy.quant.kv_cache import KV_BITS, QUANTIZER, dequantize_kv, pack_stored, unpack_stored

# what the node reads: codes with a scale and zero point per token (int8, int4), or E4M3 codes with
# one static scale (fp8)
KERNEL_FORMATS = ("int8", "int4", "fp8")


@torch.library.custom_op("lrq::quantized_cache_attention", mutates_args=())
def quantized_cache_attention(
    query: torch.Tensor, key_codes: torch.Tensor, key_scale: torch.Tensor, key_zero: torch.Tensor | None,
    value_codes: torch.Tensor, value_scale: torch.Tensor, value_zero: torch.Tensor | None, fmt: str, scale: float,
) -> torch.Tensor:
    """Reference: query [B, H, S, D] (rotary applied), the stored cache [B, KV, T, ·] of T = past + S
    tokens (codes packed for int4; fp8: E4M3 codes, the scales [1], no zero points) -> out [B, S, H·D];
    query i sees tokens 0 .. past + i."""
    keys, values = (dequantize_kv(unpack_stored(_stored(codes, step, zero), fmt, step), fmt) for codes, step, zero in (
        (key_codes, key_scale, key_zero), (value_codes, value_scale, value_zero)))
    batch, heads, seq, dim = query.shape
    total = keys.shape[2]
    repeat = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    allowed = (total - seq + torch.arange(seq))[:, None] >= torch.arange(total)[None, :]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, heads * dim)


def _stored(codes, scale, zero) -> tuple:
    """The stored form unpack_stored takes: (codes, scale, zero), or fp8's (codes,) (its scale given apart)."""
    return (codes,) if zero is None else (codes, scale, zero)


@quantized_cache_attention.register_fake
def _(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, fmt, scale):
    batch, heads, seq, dim = query.shape
    return query.new_empty(batch, seq, heads * dim)


def quantized_cache_attention_onnx(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                                   fmt: str, scale: float):
    """ONNX translation: one ai.lrq.cpu::QuantizedCacheAttention."""
    from onnxscript.values import Opset

    from lrq_deploy.runtime.cpu_kernels import DOMAIN

    _register_schema()
    return Opset(DOMAIN, 1).QuantizedCacheAttention(query, key_codes, key_scale, key_zero, value_codes, value_scale,
                                                     value_zero, bits=KV_BITS[fmt], e4m3=int(fmt == "fp8"), scale=scale)


def _register_schema() -> None:
    """Declare the op to onnx, so onnxscript can emit it and the checker can check its node."""
    import onnx
    from onnx.defs import OpSchema

    from lrq_deploy.runtime.cpu_kernels import DOMAIN

    if onnx.defs.has("QuantizedCacheAttention", DOMAIN):
        return
    param = OpSchema.FormalParameter
    types = {"query": "T", "key_scale": "T", "value_scale": "T"}
    names = ("query", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")
    optional = {"key_zero", "value_zero"}  # left out with E4M3 codes
    onnx.defs.register_schema(OpSchema(
        "QuantizedCacheAttention", DOMAIN, 1,
        doc="causal attention over an int8 / int4 / fp8 KV cache (lrq's CPU kernels)",
        inputs=[param(n, types.get(n, "U"), param_option=OpSchema.FormalParameterOption.Optional if n in optional
                      else OpSchema.FormalParameterOption.Single) for n in names],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations, scales"), ("U", ["tensor(uint8)"], "codes, zero points")],
        attributes=[OpSchema.Attribute("bits", OpSchema.AttrType.INT, "8 or 4"),
                    OpSchema.Attribute("e4m3", OpSchema.AttrType.INT, "1: the codes are E4M3 values (bits 8)"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale")]))


def supports(layout: AttentionLayout | None, fmt: str) -> bool:
    """Whether the node computes this model's attention: an int8 / int4 / fp8 cache, full causal attention
    (no window, no soft-capping), heads of an even number of dimensions."""
    return (layout is not None and fmt in KERNEL_FORMATS and layout.head_dim % 2 == 0 and layout.softcap == 0.0
            and all(layout.window_of(i) <= 0 for i in range(len(layout.modules))))


@contextmanager
def quantized_cache_attention_modules(layout: AttentionLayout, fmt: str):
    """Inside: every attention module of the layout reads its stored past from its quantizer's
    `stored_past` and leaves the present stored cache in `stored_present`."""
    originals = [module.forward for module in layout.modules]
    for module in layout.modules:
        module.forward = _fused_forward(module, layout, fmt)
    try:
        yield
    finally:
        for module, forward in zip(layout.modules, originals):
            module.forward = forward


def _fused_forward(module: nn.Module, layout: AttentionLayout, fmt: str):
    cos, sin = layout.tables[layout.modules.index(module)]
    quantizer = getattr(module, QUANTIZER)

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        batch, seq = hidden_states.shape[:2]
        q, k, v = layout.project(module, hidden_states)
        past = quantizer.stored_past
        start = past[0].shape[2]
        c, s = cos[start:start + seq], sin[start:start + seq]
        q = rotate_half(q.view(batch, seq, layout.num_heads, layout.head_dim).transpose(1, 2), c, s)
        k = rotate_half(k.view(batch, seq, layout.kv_heads, layout.head_dim).transpose(1, 2), c, s)
        v = v.view(batch, seq, layout.kv_heads, layout.head_dim).transpose(1, 2)
        quantizer(k, v)  # records the stored form of the new tokens (models/causal_lm.py records)
        new = [pack_stored(form, fmt) for form in quantizer.recorded[-1]]
        present = [torch.cat([old, part], 2) for old, part in zip(past, (*new[0], *new[1]))]
        quantizer.stored_present = present
        # keys stored rotated (--kv-rotate): the query rotated alike gives the same scores
        out = torch.ops.lrq.quantized_cache_attention(quantizer.rotate(q), *_node_inputs(present, quantizer, fmt), fmt,
                                                      layout.scale)
        return module.o_proj(out), None

    return forward


def _node_inputs(present: list, quantizer, fmt: str) -> list:
    """Key codes, scale, zero, then the values' three: fp8's static scales (one each, constants of the
    graph) beside its codes, and no zero points."""
    if fmt != "fp8":
        return present
    key_codes, value_codes = present
    return [key_codes, quantizer.k_scale.reshape(1).float(), None,
            value_codes, quantizer.v_scale.reshape(1).float(), None]
