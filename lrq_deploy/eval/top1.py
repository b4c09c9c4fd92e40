"""Top-1 accuracy of an image classifier."""

from __future__ import annotations

import torch


@torch.no_grad()
def top1_accuracy(model, images: torch.Tensor, labels: torch.Tensor, device="cpu", batch_size: int = 256) -> float:
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
    return correct / len(labels)
