"""Reconstruction losses for learnable calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output.float(), target.float())


def nlc(output: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative log of the cosine similarity per token, averaged over tokens (LRQuant's NLC)."""
    cos = F.cosine_similarity(output.float(), target.float(), dim=-1)
    return -torch.log(cos.clamp(min=eps)).mean()


class DynamicWeighting:
    """Weights each loss term by the inverse of its running mean (EMA of detached values).

    Terms of very different magnitudes (MSE vs NLC) then contribute comparably; the first
    value seeds each running mean, so the first step weighs every term as 1.
    """

    def __init__(self, names: tuple[str, ...], momentum: float = 0.95):
        self.momentum = momentum
        self.means: dict[str, float] = {}
        self.names = names

    def update(self, terms: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            value = float(terms[name].detach())
            previous = self.means.get(name)
            self.means[name] = value if previous is None else self.momentum * previous + (1 - self.momentum) * value

    def __call__(self, terms: dict[str, torch.Tensor], observed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Weighted sum of `terms`; the running means follow `observed` (default: the terms
        themselves; in data-parallel calibration, the terms summed over the ranks)."""
        self.update(terms if observed is None else observed)
        return sum(terms[n] / max(self.means[n], 1e-12) for n in self.names)
