"""RoutedExperts: the fused experts as linears, the same outputs, statistics from routed tokens and
the policy for experts routed too few tokens."""

from __future__ import annotations

import torch

from lrq_deploy.models.moe import MIN_ROUTED_TOKENS, RoutedExperts
from lrq_deploy.models.tiny import tiny_model


def _rows_seen(experts: RoutedExperts, hidden, index, weights) -> list[int]:
    seen = [0] * len(experts)
    handles = [expert.gate_up_proj.register_forward_pre_hook(
        lambda _m, args, e=e: seen.__setitem__(e, seen[e] + len(args[0]))) for e, expert in enumerate(experts)]
    try:
        experts(hidden, index, weights)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_routed_experts_equal_the_fused_module_and_see_their_tokens():
    fused = tiny_model("mixtral").model.layers[0].mlp.experts
    experts = RoutedExperts(fused)
    tokens = 4 * MIN_ROUTED_TOKENS
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 64, generator=gen)
    index = torch.tensor([[0, 1]] * (tokens - 2) + [[2, 0], [0, 1]])  # expert 2: one token, expert 3: none
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, index, weights), fused(hidden, index, weights), rtol=1e-5, atol=1e-6)
        # expert 0 is routed every token, expert 1 all but one (it sees exactly those); experts 2 and 3
        # (fewer than MIN_ROUTED_TOKENS) see every token
        assert _rows_seen(experts, hidden, index, weights) == [tokens, tokens - 1, tokens, tokens]
