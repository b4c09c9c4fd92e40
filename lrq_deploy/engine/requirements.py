"""What a build needs, decided before TensorRT sees the graph: the options, the graph's
requirements (precision, lrq plugin nodes and their attributes), the optimization profile and
how plugin nodes will be embedded. Read by the parent (build.py) and the child (builder.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from lrq_deploy.errors import LrqError
from lrq_deploy.graph_io import AXIS_RANGES
from lrq_deploy.export.graph import summarized_metadata
from lrq_deploy.quant.scheme import DOMAIN
from lrq_deploy.runtime.flavours import Flavour
from lrq_deploy.runtime.inputs import axis_of

PRECISIONS = ("int4", "fp8", "fp4", "fp16")
# The oldest GPU that runs each float precision: FP8 tensor cores from Ada (SM89) / Hopper, FP4 from Blackwell.
MIN_COMPUTE_CAPABILITY = {"fp8": (89, "Ada / Hopper"), "fp4": (100, "Blackwell")}


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "int4"
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    timing_cache: Path | None = None
    workspace_mib: int | None = None
    flavour: str | None = None
    compute_capabilities: list[str] = field(default_factory=list)
    plugins: bool = True
    verify: bool = False  # run the engine against onnxruntime after building (needs a GPU)
    force: bool = False  # replace an existing engine file (and the --triton-repo model directory)
    triton_repo: Path | None = None  # also write a Triton Inference Server model repository there

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise LrqError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise LrqError(f"--workspace must be >= 1 MiB, got {self.workspace_mib}")
        self._check_targets_run_precision()
        for name, (lo, opt, hi) in self.shapes.items():
            if not len(lo) == len(opt) == len(hi):
                raise LrqError(f"shapes of {name} have different ranks in --min/--opt/--max-shapes")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise LrqError(f"shapes of {name} must satisfy min <= opt <= max in every dimension, "
                               f"got {_dims(lo)}, {_dims(opt)}, {_dims(hi)}")


    def _check_targets_run_precision(self) -> None:
        if self.precision not in MIN_COMPUTE_CAPABILITY:
            return
        oldest, family = MIN_COMPUTE_CAPABILITY[self.precision]
        for name in self.compute_capabilities:
            digits = str(name).upper().removeprefix("SM")
            if digits.isdigit() and int(digits) < oldest:
                raise LrqError(f"--{self.precision} needs compute capability {oldest // 10}.{oldest % 10} or newer "
                               f"({family}); SM{digits} cannot run it (name --sm {oldest} or newer)")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def parse_shapes(spec: str | None) -> dict[str, tuple[int, ...]]:
    """'input_ids:1x128,past.0.key:1x2x64x32' -> {name: shape}."""
    shapes = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, dims = item.rpartition(":")
        if not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise LrqError(f"shapes are name:DxDx..., got {item!r}")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def read_graph(path: Path) -> onnx.ModelProto:
    """The ONNX model at `path` (without external data), or one clear error."""
    if Path(path).stat().st_size == 0:
        raise LrqError(f"{path} is empty (0 bytes); export it again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise LrqError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.ir_version or not model.graph.node:
        raise LrqError(f"{path} is not an ONNX model (no IR version or no graph nodes)")
    return model


def graph_requirements(path: Path, precision: str, plugins: bool = True) -> dict:
    """Check what the graph carries against the requested precision, before TensorRT sees it."""
    model = read_graph(path)
    quantized = any(n.op_type in ("DequantizeLinear", "MatMulInteger", "MatMulNBits") for n in model.graph.node)
    if quantized and {p.key: p.value for p in model.metadata_props}.get("lrq.target") == "ort":
        raise LrqError(f"{path} is an lrq graph for onnxruntime (--target ort); export with --target trt")
    lrq_nodes = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    if "QuantLinear" in lrq_nodes:
        raise LrqError(f"{path} is an unlowered trace; export it with lrq export --target trt")
    if lrq_nodes and not plugins:
        raise LrqError(f"{path} needs the lrq plugins ({', '.join(lrq_nodes)}); build it without --no-plugins")
    _check_plugin_nodes(model)
    int4 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    fp4 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    fp8 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN
           and len(t.dims) >= 2 and not _is_block_scale(model, t.name)]
    uint4 = [t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.UINT2)]
    if uint4:
        raise LrqError(f"{path} carries UINT4/UINT2 weights (the onnxruntime flavour); export with --target trt")
    expected = {"int4": int4 or lrq_nodes, "fp4": fp4, "fp8": fp8, "fp16": True}[precision]
    if not expected:
        raise LrqError(f"--{precision} needs a graph with {precision.upper()} weights; {path} has none "
                       f"(export it with lrq export --target trt, or build it with --fp16)")
    with_bias = sum(1 for n in model.graph.node if n.domain == DOMAIN and len(n.input) > 4 and n.input[4])
    return {"lrq_plugin_nodes": lrq_nodes, "lrq_nodes_with_bias": with_bias, "int4_weights": len(int4), "fp8_weights": len(fp8), "fp4_weights": len(fp4),
            "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input],
            "metadata": summarized_metadata(model)}


def _is_block_scale(model: onnx.ModelProto, name: str) -> bool:
    """An FP8 tensor whose dequantized value scales another DequantizeLinear (NVFP4 block scales)."""
    dequantized = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 1}
    return dequantized.get(name) in scales


def profile_shapes(inputs, explicit: dict) -> dict[str, tuple]:
    """(min, opt, max) per dynamic input: explicit shapes, else the named axes' default ranges."""
    shapes = {}
    for name, dims in inputs:
        if name in explicit:
            shapes[name] = explicit[name]
            continue
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue
        ranges = []
        for d in dims:
            if isinstance(d, int) and d > 0:
                ranges.append((d, d, d))
            else:
                ranges.append(AXIS_RANGES[axis_of(d) or "batch"])
        shapes[name] = tuple(tuple(r[i] for r in ranges) for i in range(3))
    return shapes


def _check_plugin_nodes(model: onnx.ModelProto) -> None:
    """Every lrq node must name a plugin we ship, with attributes its kernel supports."""
    from lrq_deploy.plugins.aot import plugin_kernel
    from lrq_deploy.plugins.trt_plugins import PLUGIN_NAMES, required_attributes

    for node in (n for n in model.graph.node if n.domain == DOMAIN):
        if node.op_type not in PLUGIN_NAMES:
            raise LrqError(f"no TensorRT plugin for {node.op_type} (plugins: {', '.join(PLUGIN_NAMES)})")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plugin_kernel(node.op_type, required_attributes(attrs, f"lrq node {node.name}"))


def plugin_kind(flavour: Flavour, requirements: dict) -> str | None:
    """How a build embeds the graph's lrq plugin nodes: "aot" (kernels inside the engine, full
    TensorRT with tensorrt.plugin), "python" (the engine runs where lrq-deploy is installed), or
    None (no lrq nodes)."""
    from lrq_deploy.plugins import trt_aot

    if not requirements["lrq_plugin_nodes"]:
        return None
    if flavour.name == "tensorrt" and not requirements["lrq_nodes_with_bias"] and trt_aot.supports_aot():
        return "aot"
    return "python"
