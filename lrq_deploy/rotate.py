"""Orthogonal rotations of a transformer, folded exactly (R1, R2) or applied online (R4), as in QuaRot.

A rotation Q (Q Q^T = I) leaves a linear's output unchanged when its input is rotated and its
weight rotated the same way: (x Q)(W Q)^T = x W^T. So the residual stream can be carried in a
rotated basis (R1: embeddings and the linears writing into the stream rotated on their output
side, every linear reading it on its input side; RMSNorm commutes with Q once its weight is fused
into the linears it feeds), each attention head's values too (R2, between v_proj and o_proj), and
where no weight can absorb the rotation — the input of down_proj, a product of two projections —
the transform runs online: a Kronecker product of small Hadamard factors, a few small MatMuls
(OnlineRotation; its factors are buffers of the checkpoint, so every backend runs the same matrix).

Rotations spread a few large channels over all of them: per-token and per-channel quantizers then
see a flat distribution (what smoothing alone cannot do for a heavy tail across tokens).

Hadamard matrices: Sylvester (powers of two) and Paley's constructions (q + 1 for a prime
q = 3 mod 4, 2(q + 1) for a prime q = 1 mod 4), e.g. 12, 20, 28, 44, 172 = 4 x 43 is not covered
and falls back to a seeded random orthogonal factor of the odd part (its cost: one dense MatMul of
that size per element group). The rotated full-precision model computes the original function to
float rounding (tests/test_rotate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lrq_deploy.errors import LrqError
from lrq_deploy.models.base import LoadedModel, RotationLayout, replace_module
from lrq_deploy.quant.primitives import sylvester_hadamard

MAX_FACTOR = 64  # online power-of-two factors are split to at most this size (cost per element: sum of sizes)
MAX_PALEY = 256  # larger Paley factors would cost more than a random orthogonal factor of the odd part


# ---------------------------------------------------------------------------------------------
# Hadamard and orthogonal factors



def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[index]


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's constructions, or None."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and q % 4 == 1 and _is_prime(q):
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).view(1, -1)).contiguous()


def hadamard_factors(n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Orthogonal factors F_1..F_k (sizes multiply to n) whose Kronecker product is a Hadamard
    matrix of order n scaled to be orthogonal; an odd part with no known Hadamard order becomes one
    seeded random orthogonal factor (needs `generator`)."""
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    factors: list[torch.Tensor] = []
    if odd > 1:
        found = next(((j, h) for j in range(2, twos + 1)
                      if (odd << j) <= MAX_PALEY and (h := _paley(odd << j)) is not None), None)
        if found is not None:
            twos -= found[0]
            factors.append(found[1])
        elif generator is None:
            raise LrqError(f"width {n}: no Hadamard matrix of a size dividing it is known (odd part {odd})")
        else:
            factors.append(random_orthogonal(odd, generator) * math.sqrt(odd))
    per_factor = int(math.log2(MAX_FACTOR))
    while twos > 0:
        size = min(twos, per_factor)
        factors.append(sylvester_hadamard(1 << size))
        twos -= size
    return [f / math.sqrt(f.shape[0]) for f in factors] or [torch.ones(1, 1, dtype=torch.float64)]


def kron_all(factors: list[torch.Tensor]) -> torch.Tensor:
    out = factors[0].contiguous()
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


def rotation_matrix(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """R1 / R2 of size n, float64: the Hadamard matrix of hadamard_factors ("hadamard"), the same
    after random signs ("random-hadamard", QuaRot's), or a Haar-random orthogonal matrix."""
    if kind == "orthogonal":
        return random_orthogonal(n, generator)
    hadamard = kron_all(hadamard_factors(n, generator))
    if kind == "hadamard":
        return hadamard
    if kind != "random-hadamard":
        raise ValueError(f"unknown rotation {kind!r}")  # CalibConfig admits only calib/registry.py's ROTATIONS
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs.view(-1, 1) * hadamard


# ---------------------------------------------------------------------------------------------
# The online transform


class KroneckerTransform(nn.Module):
    """x -> x (F_1 (x) ... (x) F_k): each factor applied along its axis of x viewed as [d_1, ..., d_k]
    (a reshape, a small MatMul and a transpose per factor; standard ops in every exported graph)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.features = math.prod(sizes)
        for i, size in enumerate(sizes):
            self.register_buffer(f"factor{i}", torch.zeros(size, size))

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{i}") for i in range(len(self.sizes))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_factors(x, self.factors())

    def extra_repr(self) -> str:
        return " x ".join(map(str, self.sizes))


def apply_factors(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x (F_1 (x) ... (x) F_k) over the last axis, in x's dtype."""
    n = x.shape[-1]
    y = x.reshape(-1, n)
    for factor in factors:
        d = factor.shape[0]
        # the axis just transformed moves last, so after every factor the original order is back
        y = torch.matmul(factor.t().to(y.dtype), y.reshape(-1, d, n // d)).transpose(1, 2).reshape(-1, n)
    return y.reshape(x.shape)


class OnlineRotation(nn.Module):
    """A linear whose input is rotated at run time: linear(x T), its weight holding W T."""

    def __init__(self, transform: KroneckerTransform, linear: nn.Module):
        super().__init__()
        self.transform = transform
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.transform(x))


class CentredNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight + bias: a LayerNorm of a zero-mean stream (where the mean it
    subtracts is zero), in the form a rotation passes: no mean to subtract, a bias that rotates."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def online_transform(factors: list[torch.Tensor]) -> KroneckerTransform:
    transform = KroneckerTransform([f.shape[0] for f in factors])
    for buffer, factor in zip(transform.factors(), factors):
        buffer.copy_(factor)
    return transform


def add_rotation_structure(model: nn.Module, blocks: nn.ModuleList, record: dict) -> None:
    """Rebuild the modules a rotated checkpoint recorded: the online transforms and the centred norms
    that replaced LayerNorms (their tensors then load from its weights)."""
    online = record.get("online", {}) if isinstance(record, dict) else None
    if not isinstance(online, dict):
        raise LrqError("manifest.json: its rotation record has no online transforms table")
    norms = record.get("centred_norms", {"model": [], "blocks": []})
    for owner, names in ((model, norms.get("model", [])), *((b, norms.get("blocks", [])) for b in blocks)):
        for name in names:
            norm = _find(owner, name, nn.LayerNorm)
            replace_module(owner, name, CentredNorm(norm.normalized_shape[0], norm.eps))
    for block in blocks:
        for name, sizes in online.items():
            linear = _find(block, name)
            if not (isinstance(sizes, list) and all(isinstance(d, int) and d > 0 for d in sizes)
                    and math.prod(sizes) == linear.in_features):
                raise LrqError(f"manifest.json: the online transform of {name} ({sizes}) does not match its "
                               f"{linear.in_features} inputs")
            replace_module(block, name, OnlineRotation(KroneckerTransform(sizes), linear))


def _find(owner: nn.Module, name: str, kind: type = nn.Linear) -> nn.Module:
    try:
        module = owner.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, kind):
        raise LrqError(f"manifest.json names a rotated {name}, but the model has no {kind.__name__} there")
    return module


def online_modules(block: nn.Module) -> dict[str, OnlineRotation]:
    """The block's linears with an online transform, by name."""
    return {name: m for name, m in block.named_modules() if isinstance(m, OnlineRotation)}


def learned_factors(transform: KroneckerTransform, mixes: list[torch.Tensor]) -> list[torch.Tensor]:
    """The transform's factors each multiplied by a learned invertible matrix: F_i A_i."""
    return [f @ a for f, a in zip(transform.factors(), mixes)]


def weight_for_mixes(weight: torch.Tensor, mixes: list[torch.Tensor]) -> torch.Tensor:
    """The weight that keeps x (T A) (W A^-T)^T = x T W^T, A = A_1 (x) ... (x) A_k: W (A_1^-T (x) ...)."""
    return apply_factors(weight, [torch.linalg.inv(a).t() for a in mixes])


# ---------------------------------------------------------------------------------------------
# Folding


@dataclass(frozen=True)
class RotationPlan:
    kind: str
    seed: int
    layout: RotationLayout


def plan_rotation(loaded: LoadedModel, kind: str, seed: int) -> RotationPlan | None:
    """Check that the model can be rotated as asked, before any work; None for kind "none"."""
    if kind == "none":
        return None
    adapter = loaded.adapter
    layout = adapter.rotation_layout(loaded.model)
    if layout is None:
        families = "llama, mistral, qwen2, qwen3, phi3, mixtral, qwen3_moe, gemma, pre-LN opt, vit / deit"
        raise LrqError(f"--rotate {kind}: a {adapter.family} model cannot be rotated exactly (rotations fold into "
                       f"{families}; post-norm layouts such as BERT's, OPT-350m's and Gemma 2 / 3's normalise or "
                       "scale each sublayer's output before the residual add)")
    if loaded.materialize is not None:
        raise LrqError(f"--rotate {kind} needs the whole model in memory; drop --offload")
    for norm in _norms(adapter, loaded.model, layout):
        if getattr(norm, "bias", None) is not None and not layout.centred:
            raise LrqError(f"--rotate {kind}: {type(norm).__name__} has a bias (LayerNorm); only RMS norms commute "
                           "with a rotation")
        if layout.centred and bool((norm.weight == 0).any()):
            raise LrqError(f"--rotate {kind}: a LayerNorm weight is exactly 0, so its bias cannot move behind it")
    return RotationPlan(kind, seed, layout)


def _norms(adapter, model: nn.Module, layout: RotationLayout) -> list[nn.Module]:
    blocks = adapter.blocks(model)
    groups = [g for g in adapter.smooth_groups(model) if g.prev_kind == "norm"]
    return [model.get_submodule(layout.final_norm)] + [b.get_submodule(g.prev) for b in blocks for g in groups]


@torch.no_grad()
def rotate_model(loaded: LoadedModel, plan: RotationPlan) -> dict:
    """Fold R1 and R2 into the model and insert the online transforms; returns the manifest record."""
    model, adapter, layout = loaded.model, loaded.adapter, plan.layout
    generator = torch.Generator().manual_seed(plan.seed)
    untie_head(model, model.get_submodule(layout.head))
    blocks = adapter.blocks(model)
    hidden = model.get_submodule(layout.head).in_features
    r1 = rotation_matrix(plan.kind, hidden, generator)
    r2 = rotation_matrix(plan.kind, layout.head_dim, generator)
    groups = adapter.smooth_groups(model)
    norm_groups = [g for g in groups if g.prev_kind == "norm"]
    # the value rows of a fused projection: those its smoothing group into `out` names
    value_rows = next((g.rows for g in groups if g.prev == layout.value and layout.out in g.linears), None)
    if layout.centred:
        _centre_stream(model, blocks, layout)
    for tensor in _stream_tensors(model, layout):
        tensor.copy_(_mm(tensor, r1))
    for name in layout.input_writers:
        _rotate_output(model.get_submodule(name), r1)
    head = model.get_submodule(layout.head)
    _fuse_norm(model, layout.final_norm, [head], layout, r1)
    head.weight.copy_(_mm(head.weight, r1))
    online = {name: hadamard_factors(blocks[0].get_submodule(name).in_features,
                                     torch.Generator().manual_seed(plan.seed + 1)) for name in layout.online}
    for block in blocks:
        for group in norm_groups:
            readers = [block.get_submodule(n) for n in group.linears + group.followers]
            _fuse_norm(block, group.prev, readers, layout, r1)
            for linear in readers:
                linear.weight.copy_(_mm(linear.weight, r1))
        for name in layout.writers:
            _rotate_output(block.get_submodule(name), r1)
        _rotate_heads(block.get_submodule(layout.value), block.get_submodule(layout.out), r2, value_rows)
        for name, factors in online.items():
            linear = block.get_submodule(name)
            linear.weight.copy_(apply_factors(linear.weight.double(), factors).to(linear.weight.dtype))
            replace_module(block, name, OnlineRotation(online_transform(factors).to(linear.weight.device), linear))
    record = {"kind": plan.kind, "seed": plan.seed, "r1": hidden, "r2": layout.head_dim,
              "online": {name: [f.shape[0] for f in factors] for name, factors in online.items()}}
    if layout.centred:
        record["centred_norms"] = {"model": [layout.final_norm], "blocks": sorted({g.prev for g in norm_groups})}
    return record


def _centre_stream(model: nn.Module, blocks: nn.ModuleList, layout: RotationLayout) -> None:
    """Every writer's output made zero-mean over the hidden channels: the LayerNorms then subtract a
    mean of zero (their outputs unchanged), and can become RMS norms."""
    for tensor in _stream_tensors(model, layout):
        tensor.copy_(tensor - tensor.mean(dim=-1, keepdim=True))
    writers = [model.get_submodule(n) for n in layout.input_writers]
    writers += [block.get_submodule(n) for block in blocks for n in layout.writers]
    for module in writers:
        module.weight.copy_(module.weight - module.weight.mean(dim=0, keepdim=True))
        if module.bias is not None:
            module.bias.copy_(module.bias - module.bias.mean())


def _stream_tensors(model: nn.Module, layout: RotationLayout) -> list[torch.Tensor]:
    """Model tensors whose last axis is the stream: token and position tables, class tokens."""
    return [model.get_parameter(n) for n in layout.stream_tensors]


def _mm(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return (weight.double() @ rotation.to(weight.device)).to(weight.dtype)


def _fuse_norm(owner: nn.Module, name: str, readers: list[nn.Module], layout: RotationLayout,
               rotation: torch.Tensor) -> None:
    """The norm's per-channel weight moved into the linears reading its output, so that the norm
    scales by one (what commutes with the rotation). A LayerNorm (centred stream) becomes a
    CentredNorm whose bias, divided by that weight, is rotated with the stream."""
    norm = owner.get_submodule(name)
    gain = norm.weight.double() + layout.norm_offset
    for linear in readers:
        linear.weight.copy_((linear.weight.double() * gain.view(1, -1)).to(linear.weight.dtype))
    if not layout.centred:
        norm.weight.fill_(1.0 - layout.norm_offset)
        return
    centred = CentredNorm(gain.numel(), norm.eps).to(norm.weight.device)
    if norm.bias is not None:
        centred.bias.copy_(((norm.bias.double() / gain) @ rotation.to(gain.device)).to(centred.bias.dtype))
    replace_module(owner, name, centred)


def _rotate_output(linear: nn.Module, rotation: torch.Tensor) -> None:
    """out -> out Q: W' = Q^T W, b' = b Q (a convolution's output channels alike)."""
    rotation = rotation.to(linear.weight.device)
    weight = linear.weight.double().flatten(1)
    linear.weight.copy_((rotation.t() @ weight).view(linear.weight.shape).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ rotation).to(linear.bias.dtype))


def _rotate_heads(value: nn.Linear, out: nn.Linear, rotation: torch.Tensor, rows: tuple[int, int] | None) -> None:
    """Each head's values rotated (v_h Q: rows of v_proj, or the value rows of a fused projection),
    o_proj's columns of every head rotated alike."""
    d = rotation.shape[0]
    rotation = rotation.to(value.weight.device)
    rows = slice(*rows) if rows else slice(None)
    weight = value.weight[rows]
    w = weight.double().view(-1, d, value.in_features)
    weight.copy_(torch.matmul(rotation.t(), w).reshape(weight.shape).to(weight.dtype))
    if value.bias is not None:
        bias = value.bias[rows]
        bias.copy_((bias.double().view(-1, d) @ rotation).flatten().to(bias.dtype))
    w = out.weight.double().view(out.out_features, -1, d)
    out.weight.copy_(torch.matmul(w, rotation).reshape(out.weight.shape).to(out.weight.dtype))


def untie_head(model: nn.Module, head: nn.Linear) -> None:
    """A head sharing its weight with the input embeddings gets a weight of its own."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight is head.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        for sub in ("text_config", "get_text_config"):
            text = getattr(config, sub, None)
            text = text() if callable(text) else text
            if text is not None and getattr(text, "tie_word_embeddings", False):
                text.tie_word_embeddings = False
