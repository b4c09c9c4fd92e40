"""TensorRT engines: build from our ONNX graphs, run for benchmarks (TensorRT imported lazily)."""

from lrq_deploy.engine.build import PRECISIONS, BuildOptions, build_engine, parse_shapes
from lrq_deploy.engine.flavours import INSTALL_HINT, load_flavour


def __getattr__(name):
    if name == "TrtRunner":  # imports torch.cuda machinery only when an engine is benchmarked
        from lrq_deploy.engine.runner import TrtRunner

        return TrtRunner
    raise AttributeError(name)


__all__ = ["INSTALL_HINT", "PRECISIONS", "BuildOptions", "TrtRunner", "build_engine", "load_flavour", "parse_shapes"]
