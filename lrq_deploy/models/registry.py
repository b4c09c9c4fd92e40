"""The family adapters: one instance per family; a new family is one adapter module plus one
entry in ADAPTERS."""

from __future__ import annotations

from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import ModelAdapter
from lrq_deploy.models.bert import BertAdapter
from lrq_deploy.models.gemma import GemmaAdapter
from lrq_deploy.models.llama import LlamaAdapter
from lrq_deploy.models.llava import LlavaAdapter
from lrq_deploy.models.moe import MoeAdapter
from lrq_deploy.models.opt import OptAdapter
from lrq_deploy.models.phi3 import Phi3Adapter
from lrq_deploy.models.qwen3 import Qwen3Adapter
from lrq_deploy.models.vit import VitAdapter

ADAPTERS: list[ModelAdapter] = [LlamaAdapter(), Qwen3Adapter(), GemmaAdapter(), Phi3Adapter(), MoeAdapter(),
                                OptAdapter(), LlavaAdapter(), BertAdapter(), VitAdapter()]


def adapter_for_family(family: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise LrqError(f"unknown model family {family!r} (known: {', '.join(a.family for a in ADAPTERS)})")


def hf_adapter(model_type: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if model_type in getattr(adapter, "model_types", ()):
            return adapter
    raise LrqError(f"unsupported architecture {model_type!r} (supported: {supported_families()})")


def supported_families() -> str:
    """Each family with the HF model types it serves, e.g. "llama (llama, mistral, qwen2), ..."."""
    return ", ".join(f"{a.family} ({a.serves})" for a in ADAPTERS)
