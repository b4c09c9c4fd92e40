"""LRQuant: learnable smoothing (log-equivalent initialisation) and weight clipping, MSE + NLC."""

from __future__ import annotations

from lrq_deploy.calib.methods._learnable import LearnableOptions, learn_with, quantize_head
from lrq_deploy.calib.recipe import Recipe
from lrq_deploy.calib.registry import Method

RECIPE = Recipe(init="log", use_nlc=True, rotation=False, two_branch=False, dynamic_weighting=False)
METHOD = Method("lrquant", LearnableOptions, learn_with(RECIPE), "log-equivalent init, MSE + NLC", resumable=True,
                order=3, quantize_head=quantize_head)
