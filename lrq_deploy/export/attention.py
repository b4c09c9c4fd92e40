"""Attention of `--with-past` graphs for onnxruntime as one GroupQueryAttention node.

torch exports a decoder layer's attention as some thirty standard ops (rotary embedding spelled
out in Slice / Neg / Concat / Mul, the KV-cache Concat, key/value heads repeated with Expand,
MatMul, the causal mask, Softmax, MatMul, and the reshapes and transposes between them).
onnxruntime runs all of it as one contrib kernel, com.microsoft.GroupQueryAttention: rotary
embedding from cos/sin tables, the cache append, grouped-query attention with the causal offset
of the past. During the trace each attention module of the layout an adapter gives
(ModelAdapter.attention_layout) calls the custom op `lrq::group_query_attention` between its
projections; the op's eager body is the reference arithmetic, its ONNX form that one node.

The graph's inputs and outputs stay those of every lrq `--with-past` graph: the node's
seqlens_k and total_sequence_length are computed in the graph from the shapes of the past and of
the new tokens (no padding: every row has the same length). `lengths_from_mask` gives a graph an
attention_mask input instead and computes both from it: a runtime can then keep each layer's cache
in one buffer of the full length, bound as past and present at once, which the node appends to in
place rather than copying the past into a new present every step (onnxruntime-genai's
past_present_share_buffer; OrtDecoder in bench/decode.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrq_deploy.export.graph import MICROSOFT, consumers, drop_dead_nodes, producers, set_nodes
from lrq_deploy.graph_io import ATTENTION_MASK, BATCH_AXIS, TOTAL_AXIS
from lrq_deploy.models.attention import AttentionLayout

OPTIONAL_INPUTS = ("key", "value", "cos_cache", "sin_cache")  # key / value: absent when query packs q, k, v


@torch.library.custom_op("lrq::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    seqlens_k: torch.Tensor, total_length: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
    kv_heads: int, scale: float, window: int = -1, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: rotary (rotate-half) at positions past..past+S-1, cache append, causal
    grouped-query attention (each query sees the last `window` tokens, itself included, where
    window > 0; scores soft-capped where softcap > 0). query [B, S, H·D], key/value [B, S, KV·D],
    past [B, KV, P, D], seqlens_k [B] int32 (P+S-1 in every row: no padding), total_length int32
    scalar (P+S) -> (out [B, S, H·D], present key, present value [B, KV, P+S, D]). seqlens_k and
    total_length are carried for the ONNX node only: this reference takes both from the shapes."""
    batch, seq, _ = query.shape
    head_dim = past_key.shape[-1]
    start = past_key.shape[2]
    c, s = cos[start:start + seq], sin[start:start + seq]
    q = rotate_half(query.view(batch, seq, num_heads, head_dim).transpose(1, 2), c, s)
    k = rotate_half(key.view(batch, seq, kv_heads, head_dim).transpose(1, 2), c, s)
    v = value.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    present_key, present_value = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    repeat = num_heads // kv_heads
    keys, values = present_key.repeat_interleave(repeat, 1), present_value.repeat_interleave(repeat, 1)
    behind = (start + torch.arange(seq))[:, None] - torch.arange(start + seq)[None, :]  # query position - key position
    allowed = (behind >= 0) & ((behind < window) if window > 0 else True)
    if softcap > 0:
        scores = torch.tanh(q @ keys.transpose(-1, -2) * (scale / softcap)) * softcap
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads, kv_heads, scale,
      window=-1, softcap=0.0):
    batch, seq, _ = query.shape
    present = past_key.new_empty(batch, kv_heads, past_key.shape[2] + seq, past_key.shape[3])
    return query.new_empty(query.shape), present, torch.empty_like(present)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def group_query_attention_onnx(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin,
                               num_heads: int, kv_heads: int, scale: float, window: int = -1, softcap: float = 0.0):
    """ONNX translation: one com.microsoft.GroupQueryAttention with its rotary."""
    from onnxscript.values import Opset

    _register_schema()
    microsoft = Opset(MICROSOFT, 1)
    return microsoft.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0,
        local_window_size=window,  # the same count as transformers' sliding_window (the query included); -1: none
        softcap=softcap, _num_outputs=3)


def _register_schema() -> None:
    """Declare com.microsoft.GroupQueryAttention (the inputs and attributes used here) to onnx, so
    onnxscript can emit it; onnxruntime holds the kernel."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("GroupQueryAttention", MICROSOFT):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    names = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache")
    types = {"seqlens_k": "M", "total_sequence_length": "M"}
    schema = OpSchema(
        "GroupQueryAttention", MICROSOFT, 1, doc="onnxruntime's grouped-query attention with KV cache and rotary",
        inputs=[param(n, types.get(n, "T"), param_option=optional if n in OPTIONAL_INPUTS else
                      OpSchema.FormalParameterOption.Single) for n in names],
        outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("M", ["tensor(int32)"], "lengths")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
                    OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("local_window_size", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("softcap", OpSchema.AttrType.FLOAT, "")],
    )
    onnx.defs.register_schema(schema)


def _forget_schema() -> None:
    """Take the partial schema back after the trace: onnx's checker then reads GroupQueryAttention
    as onnxruntime's own op (not checked), as it does in any other process; with the schema in place
    it would refuse the attributes onnxruntime writes into graphs it saves (--genai)."""
    import onnx

    if onnx.defs.has("GroupQueryAttention", MICROSOFT):
        onnx.defs.deregister_schema("GroupQueryAttention", 1, MICROSOFT)


TRANSLATIONS = {torch.ops.lrq.group_query_attention.default: group_query_attention_onnx}


@contextmanager
def group_query_attention_modules(layout: AttentionLayout):
    """Inside: every attention module of the layout runs through lrq::group_query_attention,
    reading its past from the cache the model is called with and leaving the present there."""
    originals = [module.forward for module in layout.modules]
    for module in layout.modules:
        module.forward = _fused_forward(module, layout)
    try:
        yield
    finally:
        for module, forward in zip(layout.modules, originals):
            module.forward = forward
        _forget_schema()


def _fused_forward(module: nn.Module, layout: AttentionLayout):
    index = layout.modules.index(module)
    window, (cos, sin) = layout.window_of(index), layout.tables[index]

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = cache.layers[module.layer_idx]
        batch, seq = hidden_states.shape[:2]
        # from the symbolic sizes every layer shares: one computation in the graph, not one per layer
        total = layer.keys.shape[2] + seq
        seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32)
        total_length = torch.full((), total, dtype=torch.int32)
        out, present_key, present_value = torch.ops.lrq.group_query_attention(
            *layout.project(module, hidden_states), layer.keys, layer.values, seqlens_k, total_length, cos, sin,
            layout.num_heads, layout.kv_heads, layout.scale, window, layout.softcap)
        layer.keys, layer.values = present_key, present_value
        return module.o_proj(out), None

    return forward


def pack_qkv(model) -> int:
    """Where one fused linear computes q, k and v and a Split hands them to a GroupQueryAttention
    (export/fuse.py), give the node the packed [B, S, (H + 2 KV)·D] tensor instead (its packed-QKV
    form, key and value inputs empty) and drop the Split; returns how many nodes were packed."""
    producer, readers = producers(model), consumers(model)
    dropped = set()
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != MICROSOFT:
            continue
        split = producer.get(node.input[0])
        if (split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3])
                or any(len(readers[name]) != 1 for name in split.output)):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        dropped.add(split.output[0])
    if dropped:
        set_nodes(model, [n for n in model.graph.node if not (n.op_type == "Split" and n.output[0] in dropped)])
    return len(dropped)


def lengths_from_mask(model) -> int:
    """Give a GroupQueryAttention graph an attention_mask input [batch, total] (int64, 1 per token of
    past and new ones) and feed every node seqlens_k = sum(mask) - 1 and total_sequence_length =
    the mask's length, computed once; the shape arithmetic it replaces is removed. Returns how
    many nodes now read the mask (0: the graph has none, and is left as it was)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == MICROSOFT]
    if not nodes:
        return 0
    model.graph.input.insert(1, helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, [BATCH_AXIS, TOTAL_AXIS]))
    constants = [numpy_helper.from_array(np.array(value, np.int64), name) for name, value in
                 (("lrq.mask.axis", [1]), ("lrq.mask.one", 1), ("lrq.mask.first", [0]))]
    model.graph.initializer.extend(constants)
    seqlens, total = "lrq.mask.seqlens_k", "lrq.mask.total_sequence_length"
    computed = [
        helper.make_node("ReduceSum", [ATTENTION_MASK, "lrq.mask.axis"], ["lrq.mask.lengths"], keepdims=0),
        helper.make_node("Sub", ["lrq.mask.lengths", "lrq.mask.one"], ["lrq.mask.last"]),
        helper.make_node("Cast", ["lrq.mask.last"], [seqlens], to=TensorProto.INT32),
        helper.make_node("Shape", [ATTENTION_MASK], ["lrq.mask.length"], start=1, end=2),
        helper.make_node("Squeeze", ["lrq.mask.length", "lrq.mask.first"], ["lrq.mask.length_scalar"]),
        helper.make_node("Cast", ["lrq.mask.length_scalar"], [total], to=TensorProto.INT32),
    ]
    for node in nodes:
        node.input[5], node.input[6] = seqlens, total
    set_nodes(model, computed + list(model.graph.node))
    drop_dead_nodes(model)
    return len(nodes)
