"""TensorRT engines: build from our ONNX graphs (TensorRT imported lazily); running them is the
runtime layer's (lrq_deploy.runtime.trt)."""

from lrq_deploy.engine.build import build_engine
from lrq_deploy.engine.requirements import PRECISIONS, BuildOptions, parse_shapes
from lrq_deploy.runtime.flavours import INSTALL_HINT, load_flavour

__all__ = ["INSTALL_HINT", "PRECISIONS", "BuildOptions", "build_engine", "load_flavour", "parse_shapes"]
