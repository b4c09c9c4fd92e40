"""One input generator for every runner: feeds made from tensor specs whose symbolic dims carry
the adapter's axis names (models/base.py), whether the specs come from an adapter's graph_io
or from a graph's or engine's inputs."""

from __future__ import annotations

import numpy as np

from lrq_deploy.graph_io import ATTENTION_MASK, BATCH_AXIS, PAST_AXIS, PAST_PREFIX, SEQ_AXIS, TOTAL_AXIS

TOKEN_RANGE = 100  # input ids drawn from [0, 100): valid for every vocabulary


def axis_of(dim) -> str | None:
    """The axis a symbolic dim stands for, by the axis name it contains (None: unknown)."""
    name = str(dim)
    # "past" first: "past_seq" is a past axis; dims the exporter left unnamed are batch dims
    return next((axis for axis in (PAST_AXIS, SEQ_AXIS, BATCH_AXIS) if axis in name), None)


def axis_size(dim, sizes: dict[str, int]) -> int:
    """A dim's size: fixed ints as they are; a symbolic dim by its axis (the total axis: past +
    new tokens; unknown axes: 1)."""
    if isinstance(dim, (int, np.integer)) and dim > 0:
        return int(dim)
    if str(dim) == TOTAL_AXIS:
        return sizes.get(PAST_AXIS, 0) + sizes.get(SEQ_AXIS, 1)
    axis = axis_of(dim)
    return sizes[axis] if axis in sizes else 1


def make_feeds(specs, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs: token ids for integer inputs (attention masks all ones), standard normal
    values for float ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = tuple(axis_size(d, sizes) for d in spec.dims)
        if spec.name == ATTENTION_MASK:
            feeds[spec.name] = np.ones(shape, dtype=np.dtype(spec.dtype))
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            feeds[spec.name] = rng.integers(0, TOKEN_RANGE, shape, dtype=np.dtype(spec.dtype))
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def has_kv_cache(specs) -> bool:
    return any(s.name.startswith(PAST_PREFIX) for s in specs)


def benchmark_sizes(specs, batch: int, seq_len: int) -> tuple[dict[str, int], str, int, str]:
    """Axis sizes for one timed inference and what it is: a decode step over a KV cache of
    seq_len tokens when the graph has past inputs, else a prefill of seq_len tokens, or images.
    Returns (sizes, description, items per inference, unit)."""
    tokens = any(s.name == "input_ids" for s in specs) or any(axis_of(d) == SEQ_AXIS for s in specs for d in s.dims)
    if not tokens:  # images
        shape = next(tuple(axis_size(d, {BATCH_AXIS: batch}) for d in s.dims) for s in specs)
        return {BATCH_AXIS: batch}, f"batch {batch} images {shape[1:]}", batch, "images"
    if has_kv_cache(specs):
        sizes = {BATCH_AXIS: batch, SEQ_AXIS: 1, PAST_AXIS: seq_len}
        return sizes, f"decode step, batch {batch}, KV cache {seq_len}", batch, "tokens"
    sizes = {BATCH_AXIS: batch, SEQ_AXIS: seq_len, PAST_AXIS: 0}  # token ids, or embeddings (LLaVA's language model)
    return sizes, f"prefill, batch {batch} x {seq_len} tokens", batch * seq_len, "tokens"
