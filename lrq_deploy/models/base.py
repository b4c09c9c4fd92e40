"""The adapter interface: everything family-specific about a model lives behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lrq_deploy.graph_io import GraphIO


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that share one input, and the module whose output can absorb X / s.

    prev_kind: "norm" (scale the norm's weight/bias) or "linear" (scale the output rows of
    the linear named `prev`; `repeat` > 1 when the consumer sees each channel of `prev`
    repeated, e.g. v_proj -> o_proj under grouped-query attention).
    shiftable: the absorbing module has a bias, so a channel shift X - delta can be folded too.
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    repeat: int = 1
    kv_heads: int = 1  # with repeat > 1: prev's channels are kv_heads blocks, each repeated `repeat` times
    rows: tuple[int, int] | None = None  # slice of prev's output rows feeding the group (fused qkv)
    shiftable: bool = False
    norm_offset: float = 0.0  # a norm that multiplies by (norm_offset + weight), e.g. Gemma's (1 + weight)
    followers: tuple[str, ...] = ()  # modules reading the same input that absorb the scale, unquantized (MoE router)
    routed: bool = False  # the linears see routed subsets of the input (experts): not one shared input

    @property
    def observed(self) -> str:
        """The module whose input statistics stand for the group's input."""
        return self.followers[0] if self.routed and self.followers else self.linears[0]


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` inside `root`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@dataclass(frozen=True)
class RotationLayout:
    """Where orthogonal rotations fold into a transformer (names: model-level for stream_tensors /
    input_writers / final_norm / head, block-level for the rest). The residual stream is rotated by
    R1: the tensors added to it (token tables, class tokens) and its writers on their output side,
    every linear reading a norm's output (the smoothing table's norm groups, norm weights fused into
    them first) and the head on their input side. R2 rotates each attention head between `value`
    (output rows; of a fused projection, the rows of its smoothing group into `out`) and `out` (input
    columns). `online` linears get an orthogonal transform applied to
    their input at run time (no producer can absorb it)."""

    final_norm: str
    head: str
    writers: tuple[str, ...]
    value: str
    out: str
    head_dim: int
    online: tuple[str, ...] = ()
    norm_offset: float = 0.0
    # LayerNorm (mean and bias): the stream is centred first (every writer's output made zero-mean),
    # so each norm can become an RMS norm, whose weight folds into its readers and whose bias stays
    centred: bool = False
    # model parameters whose rows are added to the stream: token and position tables, class tokens
    stream_tensors: tuple[str, ...] = ()
    input_writers: tuple[str, ...] = ()  # model modules writing the stream through their output channels (patch conv)


@dataclass
class BlockInputs:
    """Inputs of one transformer block for all calibration samples."""

    hidden: torch.Tensor  # [N, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # blocks whose keyword arguments differ from block 0's (another layer type: sliding-window
    # mask, local rotary tables); blocks of one type share one dict
    block_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def kwargs_for(self, index: int) -> dict[str, Any]:
        return self.block_kwargs.get(index, self.kwargs)


class ModelAdapter:
    """One model family. Subclasses are small tables plus a few hooks."""

    family: str = ""
    task: str = ""  # "causal_lm" | "image_classification" | "sentence_embedding" | "image_text_to_text"
    default_metric: str = ""
    serves: str = ""  # what the family accepts, for error messages (e.g. HF model types)
    agreement_argmax = False  # agreement_outputs are class / token scores (top-1 agreement is meaningful)
    compares_outputs = False  # eval also compares agreement_outputs of the FP and quantized models

    restructures = False  # restructure() rewrites modules (lazy loading by safetensors names cannot serve it)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def restructure(self, model: nn.Module) -> None:
        """Rewrite, in place, modules lrq cannot quantize as they are (e.g. experts stored as 3-D
        tensors) into linears computing the same; applied to every model the family loads or builds."""

    def head(self, model: nn.Module) -> tuple[str, nn.Linear] | None:
        """(name, linear) of the output head that --quantize-head quantizes; None: the model has none."""
        return None

    def rotation_layout(self, model: nn.Module) -> RotationLayout | None:
        """Where --rotate folds rotations into this model; None: the family cannot be rotated exactly."""
        return None

    def linear_names(self, block: nn.Module) -> list[str]:
        """Names (relative to the block) of the linears to quantize."""
        return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]

    def smooth_groups(self, model: nn.Module) -> list[SmoothGroup]:
        return []

    def capture_block_inputs(self, model: nn.Module, batches: list[torch.Tensor]) -> BlockInputs:
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def calibration_batches(self, source, calib_path: Path | None, nsamples: int, seqlen: int | None, seed: int):
        raise NotImplementedError

    def max_sequence_length(self, model: nn.Module) -> int | None:
        """The longest token sequence the model runs (None: not a sequence model)."""
        return None

    def cached_attention(self, model: nn.Module) -> list[nn.Module] | None:
        """The attention modules that keep a KV cache, each calling `cache.update(key, value,
        layer_idx)` with its new keys (after rotary) and values (quant/kv_cache.py); None: the family
        has no cache lrq can quantize."""
        return None

    def save_architecture(self, source, out_dir: Path) -> dict:
        """Write what is needed to rebuild the model skeleton; return manifest extras."""
        raise NotImplementedError

    def build_skeleton(self, ckpt_dir: Path, extras: dict) -> tuple[nn.Module, Any]:
        """Rebuild (model, tokenizer-or-None) with random weights from a checkpoint directory."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, source, data_path: Path | None, limit: int | None, device,
                 seq_len: int | None = None) -> dict:
        """The model's metric; `seq_len` is the scoring window of language models (None: the default)."""
        raise NotImplementedError

    def agreement_outputs(self, model: nn.Module, source, data_path: Path | None, limit: int | None,
                          device) -> list[torch.Tensor] | None:
        """Outputs on held-out samples that eval compares row by row between the full-precision
        and the quantized model (metrics.output_agreement); None: the family's metric suffices."""
        return None

    def graph_io(self, model: nn.Module, with_past: bool = False) -> GraphIO:
        """Names, dtypes and axes of the deployment graph's inputs and outputs."""
        raise NotImplementedError

    def attention_layout(self, model: nn.Module):
        """The model's attention as onnxruntime's GroupQueryAttention runs it (models/attention.py
        AttentionLayout), or None where that kernel does not compute what the model does."""
        return None

    def export_spec(self, model: nn.Module, batch: int | None, seq_len: int | None, with_past: bool) -> ExportSpec:
        """The graph to export; dynamic batch (and sequence) axes unless batch / seq_len are given."""
        raise NotImplementedError

    def verification_set(self, source, data_path: Path | None, limit: int | None,
                         batch: int | None = None, seq_len: int | None = None):
        """(list of input batches, list of label batches or None) for comparing backends; with
        batch / seq_len, every batch has that shape (a graph exported with static axes)."""
        raise NotImplementedError

    def metric_from_logits(self, inputs: list, logits: list, labels: list | None) -> dict:
        raise NotImplementedError


@dataclass
class ExportSpec:
    """What torch.export needs to trace a model's deployment graph."""

    module: "torch.nn.Module"
    example_args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple | None  # same structure as example_args; None = static shapes


@dataclass
class LoadedModel:
    model: nn.Module
    adapter: ModelAdapter
    tokenizer: Any
    spec: str  # how the user named it, recorded in the manifest
    extras: dict = field(default_factory=dict)
    # Lazily loaded models (calibrate --offload): reads a block's parameters from disk when it is needed.
    materialize: "Callable[[nn.Module], None] | None" = None


def static_batches(items: torch.Tensor, batch: int | None, default: int) -> list[torch.Tensor]:
    """Split along dim 0 into batches of `batch` (a static graph: the incomplete tail is dropped)
    or of `default` (a dynamic graph)."""
    if batch is None:
        return list(items.split(default))
    if len(items) < batch:
        from lrq_deploy.errors import LrqError

        raise LrqError(f"verification has {len(items)} samples, fewer than the static batch {batch}; raise --limit")
    return list(items[: len(items) // batch * batch].split(batch))
