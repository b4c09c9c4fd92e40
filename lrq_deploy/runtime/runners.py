"""Runners with Polygraphy's interface (polygraphy.backend.base.BaseRunner: activate,
get_input_metadata, infer(feed_dict) -> {output: array}) on the session type of each backend:
onnxruntime through Polygraphy's own OnnxrtRunner on an OrtSession, TensorRT engines on an
EngineSession (either flavour, lrq plugins registered), torch models on a TorchSession."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from lrq_deploy.runtime.onnxrt import OrtSession


def ort_runner(path: Path, reference: bool = True, optimize: bool = True, device: str = "auto",
               session=None) -> BaseRunner:
    """Polygraphy's OnnxrtRunner on `session`, by default the reference session of `path`
    (optimizations off, CPU) or, with reference=False, the deployed one."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if session is None:
        session = OrtSession(path, reference, optimize, device).session
    return OnnxrtRunner(session, name=f"onnxruntime:{Path(path).name}")


class TrtRunner(BaseRunner):
    """A serialized engine (build record checked, lrq plugins registered) on numpy feeds."""

    def __init__(self, path: Path, flavour: str | None = None, name: str | None = None):
        super().__init__(name=name or f"tensorrt:{Path(path).name}", prefix="lrq-trt")
        self.path, self.flavour = Path(path), flavour
        self.session = None

    def activate_impl(self):
        from lrq_deploy.runtime.trt import EngineSession

        self.session = EngineSession(self.path, self.flavour)

    def get_input_metadata_impl(self):
        return _metadata(self.session.input_specs())

    def infer_impl(self, feed_dict):
        return OrderedDict(self.session.run(dict(feed_dict)))

    def deactivate_impl(self):
        self.session = None


class TorchRunner(BaseRunner):
    """A torch model (TorchSession) run as its deployment graph would be."""

    def __init__(self, loaded, device, with_past: bool = False, name: str | None = None):
        super().__init__(name=name or f"torch:{loaded.spec}", prefix="lrq-torch")
        self.loaded, self.device, self.with_past = loaded, device, with_past
        self.io = loaded.adapter.graph_io(loaded.model, with_past)
        self.session = None

    def activate_impl(self):
        from lrq_deploy.runtime.torch_models import TorchSession

        self.session = TorchSession(self.loaded, self.device, self.with_past)

    def get_input_metadata_impl(self):
        return _metadata(self.io.inputs)

    def infer_impl(self, feed_dict):
        return OrderedDict(self.session.run(feed_dict))

    def deactivate_impl(self):
        self.session = None


def _metadata(specs) -> TensorMetadata:
    """Polygraphy's input metadata from tensor specs (dynamic axes keep their names)."""
    meta = TensorMetadata()
    for spec in specs:
        meta.add(spec.name, dtype=DataType.from_dtype(np.dtype(spec.dtype)), shape=spec.dims)
    return meta
