"""`lrq build-engine`: ONNX graph -> serialized TensorRT engine.

The graph is checked here; TensorRT then parses and builds it in a child process
(`lrq_deploy.engine.worker`), so that a TensorRT abort becomes one error line and the
process can be given the environment its flavour needs (see Flavour.build_process_env).
`lrq`-domain nodes become layers of our plugins (plugins/trt_plugins.py), registered in
the child before parsing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from lrq_deploy.atomic import atomic_write, check_output_file, remove_stale_temporaries, temporary_path, write_json
from lrq_deploy.runtime.flavours import Flavour, load_flavour
from lrq_deploy.runtime.engine_record import build_record, record_path
from lrq_deploy.errors import LrqError
from lrq_deploy.graph_io import AXIS_RANGES
from lrq_deploy.runtime.inputs import axis_of

PRECISIONS = ("int4", "fp8", "fp4", "fp16")
# Default profile ranges for our graphs' named dynamic axes: (min, opt, max).



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
        for name, (lo, opt, hi) in self.shapes.items():
            if not len(lo) == len(opt) == len(hi):
                raise LrqError(f"shapes of {name} have different ranks in --min/--opt/--max-shapes")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise LrqError(f"shapes of {name} must satisfy min <= opt <= max in every dimension, "
                               f"got {_dims(lo)}, {_dims(opt)}, {_dims(hi)}")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


VERIFY_MIN_COSINE = 0.999


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
    lrq_nodes = sorted({n.op_type for n in model.graph.node if n.domain == "lrq"})
    if "QuantLinear" in lrq_nodes:
        raise LrqError(f"{path} is an unlowered trace; export it with lrq export --target trt")
    if lrq_nodes and not plugins:
        raise LrqError(f"{path} needs the lrq plugins ({', '.join(lrq_nodes)}); build it without --no-plugins")
    _check_plugin_nodes(model)
    int4 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    fp4 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    fp8 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    uint4 = [t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.UINT2)]
    if uint4:
        raise LrqError(f"{path} carries UINT4/UINT2 weights (the onnxruntime flavour); export with --target trt")
    expected = {"int4": int4 or lrq_nodes, "fp4": fp4, "fp8": fp8, "fp16": True}[precision]
    if not expected:
        raise LrqError(f"--{precision} needs a graph with {precision.upper()} weights; {path} has none "
                       f"(export it with lrq export --target trt, or build it with --fp16)")
    with_bias = sum(1 for n in model.graph.node if n.domain == "lrq" and len(n.input) > 4 and n.input[4])
    return {"lrq_plugin_nodes": lrq_nodes, "lrq_nodes_with_bias": with_bias, "int4_weights": len(int4), "fp8_weights": len(fp8), "fp4_weights": len(fp4),
            "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input],
            "metadata": {p.key: p.value for p in model.metadata_props}}


def _profile_shapes(inputs, explicit: dict) -> dict[str, tuple]:
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


def build_engine(onnx_path: Path, out: Path, options: BuildOptions) -> dict:
    """Build `out` from `onnx_path`; writes the engine and its build record OUT.json (what
    `lrq info` and the engine loader check) atomically."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise LrqError(f"ONNX file {onnx_path} does not exist")
    check_output_file(out, options.force, inputs=[onnx_path], option="-o")
    if options.timing_cache is not None:
        check_output_file(options.timing_cache, True, inputs=[onnx_path, out], option="--timing-cache")
    requirements = graph_requirements(onnx_path, options.precision, options.plugins)
    flavour = load_flavour(options.flavour)
    flavour.compute_capabilities(options.compute_capabilities)  # unknown targets fail before the child starts
    if options.triton_repo is not None:
        _check_triton_target(options, flavour, out, requirements)
    if options.verify:
        _check_gpu_for_verify()
    remove_stale_temporaries(out)
    staging = temporary_path(out, "-build")
    try:
        report = {**_build_in_child(flavour, onnx_path, staging, options, requirements), **requirements}
        report["engine"] = str(out)
        report["profile"] = {name: [list(shape) for shape in shapes]
                             for name, shapes in _profile_shapes(requirements["inputs"], options.shapes).items()}
        if options.verify:
            report["verify"] = _verify(staging, onnx_path, options, flavour.name)
        record = build_record(staging, onnx_path, options, flavour, report)
        write_json(record_path(out), record)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    if options.triton_repo is not None:
        from lrq_deploy.serve.triton import engine_repository

        report["triton_repo"] = str(engine_repository(out, record, options.triton_repo, force=options.force))
    return report


def _check_triton_target(options: BuildOptions, flavour: Flavour, out: Path, requirements: dict) -> None:
    """What --triton-repo would refuse after the build, refused before it."""
    from lrq_deploy.serve.triton import check_plugins_servable, check_repository_target, model_name_for

    if flavour.name != "tensorrt":
        raise LrqError("Triton's TensorRT backend runs engines of full TensorRT; --triton-repo needs "
                       "--flavour tensorrt (this build uses TensorRT for RTX)")
    check_plugins_servable(plugin_kind(flavour, requirements))
    check_repository_target(options.triton_repo, model_name_for(out), options.force)


def _check_gpu_for_verify() -> None:
    import torch

    if not torch.cuda.is_available():
        raise LrqError("--verify runs the engine, which needs a CUDA GPU; build without --verify on this machine")


def _verify(out: Path, onnx_path: Path, options: BuildOptions, flavour: str) -> dict:
    """Engine vs onnxruntime; an engine that disagrees is removed, not left looking valid."""
    from lrq_deploy.engine.verify import verify_engine

    results = verify_engine(out, onnx_path, options.shapes, flavour)
    worst = min(results.items(), key=lambda kv: kv[1]["cosine"])
    if worst[1]["cosine"] < VERIFY_MIN_COSINE:
        raise LrqError(f"the engine disagrees with onnxruntime on {worst[0]} (cosine {worst[1]['cosine']:.6f} < "
                       f"{VERIFY_MIN_COSINE}, max abs error {worst[1]['max_abs_error']:.3g}); no engine written")
    return results


def _check_plugin_nodes(model: onnx.ModelProto) -> None:
    """Every lrq node must name a plugin we ship, with attributes its kernel supports."""
    from lrq_deploy.plugins.aot import plugin_kernel
    from lrq_deploy.plugins.trt_plugins import PLUGIN_NAMES, required_attributes

    for node in (n for n in model.graph.node if n.domain == "lrq"):
        if node.op_type not in PLUGIN_NAMES:
            raise LrqError(f"no TensorRT plugin for {node.op_type} (plugins: {', '.join(PLUGIN_NAMES)})")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plugin_kernel(node.op_type, required_attributes(attrs, f"lrq node {node.name}"))


def _build_in_child(flavour: Flavour, onnx_path: Path, out: Path, options: BuildOptions, requirements: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="lrq-build-") as scratch:
        report_path = Path(scratch) / "report.json"
        request = {"onnx": str(onnx_path), "out": str(out), "report": str(report_path), "flavour": flavour.name,
                   "options": json.loads(json.dumps(asdict(options), default=str)), "requirements": requirements}
        proc = subprocess.run(
            [sys.executable, "-m", "lrq_deploy.engine.worker"], input=json.dumps(request),
            capture_output=True, text=True, env=flavour.build_process_env(Path(scratch)),
        )
        if proc.returncode != 0 or not report_path.is_file():
            raise LrqError(_child_failure(proc, onnx_path))
        return json.loads(report_path.read_text())


def _child_failure(proc: subprocess.CompletedProcess, onnx_path: Path) -> str:
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("error: ")]
    if own:
        return own[-1].removeprefix("error: ")
    last = lines[-1] if lines else "no output"
    return f"TensorRT stopped while building {onnx_path} (exit status {proc.returncode}): {last}"


def build_in_this_process(onnx_path: Path, out: Path, options: BuildOptions, flavour_name: str, requirements: dict) -> dict:
    """Parse and build in this process (the worker's side of build_engine, given the parent's
    graph_requirements); writes `out` atomically."""
    flavour = load_flavour(flavour_name)
    plugins = _register_plugins(flavour, requirements)
    serialized, layers = _build(flavour, onnx_path, options, requirements)
    atomic_write(out, lambda tmp: tmp.write_bytes(bytes(serialized)))
    return {"engine": str(out), "flavour": flavour.name, "bytes": out.stat().st_size, "layers": layers, "plugins": plugins}


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


def _register_plugins(flavour: Flavour, requirements: dict) -> str | None:
    """Register the lrq plugins this build embeds (plugin_kind); returns the kind."""
    from lrq_deploy.plugins import trt_aot, trt_plugins

    kind = plugin_kind(flavour, requirements)
    if kind == "aot":
        trt_aot.register_aot_plugins()
    elif kind == "python":
        trt_plugins.register_plugins(flavour.trt)
    return kind


def _build(flavour: Flavour, onnx_path: Path, options: BuildOptions, requirements: dict):
    trt = flavour.trt
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(flavour.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise LrqError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if options.precision == "fp16" and not flavour.strongly_typed_only:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    caps = flavour.compute_capabilities(options.compute_capabilities)
    if caps:
        config.num_compute_capabilities = len(caps)
        for index, cap in enumerate(caps):
            config.set_compute_capability(cap, index)
    shapes = _profile_shapes(requirements["inputs"], options.shapes)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    # TensorRT for RTX has no timing cache (its cache operations are no-ops).
    cache = None if flavour.strongly_typed_only else _load_timing_cache(config, options.timing_cache)
    layers = _layer_summary(network)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LrqError(f"TensorRT could not build an engine from {onnx_path} (run with a GPU or name --sm targets)")
    if cache is not None:
        _save_timing_cache(config, options.timing_cache)
    return serialized, layers


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    data = config.get_timing_cache().serialize()
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(bytes(data)))


def _layer_summary(network) -> dict[str, int]:
    counts: dict[str, int] = {}
    for index in range(network.num_layers):
        kind = str(network.get_layer(index).type).rsplit(".", 1)[-1]
        counts[kind] = counts.get(kind, 0) + 1
    return counts
