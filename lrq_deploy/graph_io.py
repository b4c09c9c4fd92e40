"""Graph-I/O vocabulary: the names and specs of deployment-graph inputs and outputs.

Shared by export (dynamic axes), the input generator (runtime/inputs.py), decoding, the
TensorRT build (optimization profiles) and the Triton repository writer. Plain Python: those
stages read it without importing the model adapters or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Axis names of graph inputs and outputs, shared by export (dynamic axes), the input generator
# (runtime/inputs.py), decoding and engine profiles: a symbolic dimension is matched by the name it contains.
BATCH_AXIS, SEQ_AXIS, PAST_AXIS = "batch", "seq", "past"
TOTAL_AXIS = "total"  # past + new tokens: the attention mask of a graph whose cache is kept in place
ATTENTION_MASK = "attention_mask"  # 1 for real tokens, 0 for padding (generated as all ones)
PAST_PREFIX, PRESENT_PREFIX = "past.", "present."


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, dims (ints, or axis names above)."""

    name: str
    dtype: str
    dims: tuple


@dataclass(frozen=True)
class GraphIO:
    """What a model's deployment graph takes and returns; `kv_cache` when it carries past
    keys/values (inputs PAST_PREFIX + "{layer}.{key|value}" -> outputs PRESENT_PREFIX + same)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kv_cache: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]



# Default (min, opt, max) of each named axis in an engine's optimization profile; verification
# of an engine feeds shapes inside them.
AXIS_RANGES = {BATCH_AXIS: (1, 1, 8), SEQ_AXIS: (1, 128, 512), PAST_AXIS: (0, 128, 1024)}
