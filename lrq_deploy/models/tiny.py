"""Tiny random configurations of the decoder families lrq serves (2-3 layers, width 64, 2,048-token
vocabulary: the bundled tokenizer's), for smoke tests of the whole chain on a new family
(tests/models/test_families.py, scripts/family_chain.py). Gemma's windows (8 tokens) are shorter
than the windows the checks use, so sliding-window masking is exercised."""

from __future__ import annotations

COMMON = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY = {
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
    # sliding layers (local rotary base) around a full one
    "gemma3_text": ("Gemma3TextConfig", dict(num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
}


def tiny_config(model_type: str):
    """A transformers config of `model_type` (one of TINY)."""
    import transformers

    name, extra = TINY[model_type]
    return getattr(transformers, name)(**{**COMMON, **extra})


def tiny_model(model_type: str, seed: int = 0):
    """A random model of `model_type` with non-trivial norm weights (Gemma's start at 0, a scale of 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.rand_like(param) * 0.5)
    return model.eval()
