"""The builder: parse the graph and build the engine, in the process that runs it (the child
of build.py, lrq_deploy.engine.worker). lrq plugins are registered first, as the graph's
requirements decided (requirements.plugin_kind)."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.atomic import atomic_write
from lrq_deploy.engine.requirements import BuildOptions, plugin_kind, profile_shapes
from lrq_deploy.errors import LrqError
from lrq_deploy.runtime.flavours import Flavour, load_flavour


def build_in_this_process(onnx_path: Path, out: Path, options: BuildOptions, flavour_name: str, requirements: dict) -> dict:
    """Parse and build in this process (the worker's side of build_engine, given the parent's
    graph_requirements); writes `out` atomically."""
    flavour = load_flavour(flavour_name)
    plugins = _register_plugins(flavour, requirements)
    serialized, layers = _build(flavour, onnx_path, options, requirements)
    atomic_write(out, lambda tmp: tmp.write_bytes(bytes(serialized)))
    return {"engine": str(out), "flavour": flavour.name, "bytes": out.stat().st_size, "layers": layers, "plugins": plugins}


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
    shapes = profile_shapes(requirements["inputs"], options.shapes)
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
    if data and len(cache.serialize()) < len(data) // 2:  # TensorRT drops an unreadable cache without an error
        raise LrqError(f"--timing-cache {path} is not a TensorRT timing cache this TensorRT can read; "
                       "remove it or name another file (lrq replaces only a timing cache)")
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
