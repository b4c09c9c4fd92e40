"""The intra-op thread count every runtime of one process uses (lrq bench --threads): torch's
thread pool, and onnxruntime sessions created after it is set. None keeps each runtime's own
default (onnxruntime: one thread per physical core; torch: per core)."""

from __future__ import annotations

from lrq_deploy.errors import LrqError

_THREADS: int | None = None


def use_threads(threads: int | None) -> None:
    global _THREADS
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise LrqError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    _THREADS = threads


def intra_op_threads() -> int | None:
    return _THREADS


def threads_in_use() -> dict:
    """What a benchmark record states: the threads set, or the runtimes' defaults."""
    import os

    return {"threads": _THREADS if _THREADS is not None else f"default ({os.cpu_count()} logical cores)"}
