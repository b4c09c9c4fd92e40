"""Model families: adapters (registry.py), what a model name refers to (specs.py) and loading
(loading.py). A new family is one adapter module plus one entry in registry.ADAPTERS."""

from __future__ import annotations

from lrq_deploy.models.base import BlockInputs, LoadedModel, ModelAdapter, SmoothGroup
from lrq_deploy.models.loading import load_model
from lrq_deploy.models.registry import ADAPTERS, adapter_for_family, supported_families
from lrq_deploy.models.specs import (
    BUNDLED, DEFAULT_MODEL, PACKAGED, PACKAGED_PREFIX, is_named_model, packaged_model,
)

__all__ = [
    "ADAPTERS", "BUNDLED", "BlockInputs", "DEFAULT_MODEL", "LoadedModel", "ModelAdapter", "PACKAGED",
    "PACKAGED_PREFIX", "SmoothGroup", "adapter_for_family", "is_named_model", "load_model", "packaged_model",
    "supported_families",
]
