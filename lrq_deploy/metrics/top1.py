"""Top-1 accuracy of an image classifier."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def top1_accuracy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    batches = labels.split(batch_size)
    return top1_from_logits((logits_fn(x) for x in images.split(batch_size)), batches)


def top1_from_logits(logits, labels) -> float:
    """Top-1 over matching sequences of logits [B, classes] and label batches [B]."""
    correct = total = 0
    for out, y in zip(logits, labels):
        correct += (out.argmax(-1).cpu() == y).sum().item()
        total += len(y)
    return correct / total
