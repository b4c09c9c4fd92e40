"""Perplexity over non-overlapping windows, averaged over predicted tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, device="cpu", batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) over every predicted token.

    The text is cut into non-overlapping windows of seqlen tokens; each window predicts its
    seqlen - 1 next tokens, and the mean is taken over those predictions (not over seqlen).
    """
    windows = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
