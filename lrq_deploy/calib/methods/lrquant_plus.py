"""LRQuant+: LRQuant with foldable rotation gains, two-branch targets and dynamic loss weighting."""

from __future__ import annotations

from lrq_deploy.calib.methods._learnable import LearnableOptions, learn_with, quantize_head
from lrq_deploy.calib.recipe import Recipe
from lrq_deploy.calib.registry import Method

RECIPE = Recipe(init="log", use_nlc=True, rotation=True, two_branch=True, dynamic_weighting=True)
METHOD = Method("lrquant+", LearnableOptions, learn_with(RECIPE),
                "LRQuant + rotation gains, two-branch targets, dynamic weighting", resumable=True, order=4,
                quantize_head=quantize_head)
