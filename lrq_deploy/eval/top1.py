"""Top-1 accuracy of an image classifier."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def top1_accuracy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        correct += (logits_fn(x).argmax(-1).cpu() == y).sum().item()
    return correct / len(labels)
