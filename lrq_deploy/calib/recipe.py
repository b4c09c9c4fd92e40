"""Recipe: what distinguishes the learnable methods; everything else is shared (learnable.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    init: str  # "log" (LRQuant) or "smoothquant" (OmniQuant)
    use_nlc: bool
    rotation: bool
    two_branch: bool
    dynamic_weighting: bool
