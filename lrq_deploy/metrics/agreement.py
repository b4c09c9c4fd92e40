"""How closely a quantized model's outputs follow the full-precision model's on the same
inputs, row by row (one row per sentence embedding, image or token position)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


def output_agreement(reference: Iterable[torch.Tensor], candidate: Iterable[torch.Tensor],
                     argmax: bool = False) -> dict:
    """Cosine similarity per row between matching [..., D] outputs: mean and 5th percentile
    (the worst 5% of rows is where a user notices); with argmax (class or token scores), the
    share of rows whose top-1 agrees too."""
    cosines, agree = [], []
    for ref, cand in zip(reference, candidate):
        ref, cand = ref.reshape(-1, ref.shape[-1]).double(), cand.reshape(-1, cand.shape[-1]).double()
        cosines.append(F.cosine_similarity(ref, cand, dim=-1, eps=1e-30))
        if argmax:
            agree.append(ref.argmax(-1) == cand.argmax(-1))
    if not cosines:
        raise ValueError("no outputs to compare")
    cos = torch.cat(cosines)
    result = {"cosine_mean": cos.mean().item(), "cosine_p5": torch.quantile(cos, 0.05).item(), "rows": cos.numel()}
    if argmax:
        result["top1_agreement"] = torch.cat(agree).float().mean().item()
    return result
