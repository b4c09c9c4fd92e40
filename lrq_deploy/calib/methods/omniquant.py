"""OmniQuant: learnable smoothing (SmoothQuant initialisation) and weight clipping, MSE loss."""

from __future__ import annotations

from dataclasses import dataclass

from lrq_deploy.calib.methods._learnable import LearnableOptions, learn_with, quantize_head
from lrq_deploy.calib.methods.smoothquant import unit_interval
from lrq_deploy.calib.recipe import Recipe
from lrq_deploy.calib.registry import Method, option


@dataclass(frozen=True)
class OmniQuantOptions(LearnableOptions):
    alpha: float = option(0.5, "SmoothQuant migration strength (also OmniQuant's initialisation).", unit_interval)


RECIPE = Recipe(init="smoothquant", use_nlc=False, rotation=False, two_branch=False, dynamic_weighting=False)
METHOD = Method("omniquant", OmniQuantOptions, learn_with(RECIPE), "learnable smoothing + clipping, MSE",
                resumable=True, order=2, quantize_head=quantize_head)
