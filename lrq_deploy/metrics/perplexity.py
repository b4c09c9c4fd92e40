"""Perplexity over non-overlapping windows, averaged over predicted tokens."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seqlen] windows of a token stream (the tail shorter than seqlen is dropped)."""
    out = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    return out if max_windows is None else out[:max_windows]


def perplexity_from_logits(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """exp(mean NLL) from (input ids [b, s], logits [b, s, vocab]) pairs; each window predicts s - 1 tokens."""
    total_nll, total_tokens = 0.0, 0
    for ids, logits in pairs:
        logits = logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, seqlen: int,
    max_windows: int | None = None, batch_size: int = 8, progress: bool = False,
) -> float:
    """Perplexity of `logits_fn` (input ids -> logits) on a token stream, mean over predicted tokens.
    progress: a bar on stderr when it is a terminal (lrq_deploy.progress)."""
    from lrq_deploy.progress import bar

    batches = windows(ids, seqlen, max_windows).split(batch_size)
    if progress:
        batches = bar(batches, "perplexity", total=len(batches), unit="batch")
    return perplexity_from_logits((batch, logits_fn(batch)) for batch in batches)
