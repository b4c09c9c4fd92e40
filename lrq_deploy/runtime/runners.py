"""Runners with Polygraphy's interface (polygraphy.backend.base.BaseRunner: activate,
get_input_metadata, infer(feed_dict) -> {output: array}): onnxruntime through Polygraphy's own
OnnxrtRunner on our sessions, TensorRT engines (either flavour, lrq plugins registered) and
torch models (checkpoints and full-precision models, inputs named by the adapter's graph_io)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from lrq_deploy.runtime.onnxrt import deployed_session, reference_session


def ort_runner(path: Path, reference: bool = True, optimize: bool = True, device: str = "auto",
               session=None) -> BaseRunner:
    """Polygraphy's OnnxrtRunner on `session`, by default the reference session of `path`
    (optimizations off, CPU) or, with reference=False, the deployed one."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if session is None:
        session = reference_session(path) if reference else deployed_session(path, optimize, device)
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
        meta = TensorMetadata()
        engine = self.session.engine
        for name in self.session.io_names("INPUT"):
            dtype = DataType.from_dtype(self.session.input_dtype(name), "torch")
            meta.add(name, dtype=dtype, shape=tuple(engine.get_tensor_shape(name)))
        return meta

    def infer_impl(self, feed_dict):
        return OrderedDict(self.session.run(dict(feed_dict)))

    def deactivate_impl(self):
        self.session = None


class TorchRunner(BaseRunner):
    """A torch model run as its deployment graph would be: inputs and outputs named by the
    adapter's graph_io, the module from its export spec (logits; with past: keys/values too)."""

    def __init__(self, loaded, device, with_past: bool = False, name: str | None = None):
        super().__init__(name=name or f"torch:{loaded.spec}", prefix="lrq-torch")
        self.loaded, self.device, self.with_past = loaded, device, with_past
        self.io = loaded.adapter.graph_io(loaded.model, with_past)
        self.module = None

    def activate_impl(self):
        self.module = self.loaded.adapter.export_spec(self.loaded.model, None, None, self.with_past).module.eval()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for spec in self.io.inputs:
            meta.add(spec.name, dtype=DataType.from_dtype(np.dtype(spec.dtype)), shape=spec.dims)
        return meta

    def infer_impl(self, feed_dict):
        import torch

        tensors = [torch.from_numpy(np.asarray(feed_dict[n])).to(self.device) for n in self.io.input_names]
        args = (tensors[0], tuple(tensors[1:])) if self.io.kv_cache else tuple(tensors)
        with torch.no_grad():
            out = self.module(*args)
        outputs = out if isinstance(out, tuple) else (out,)
        return OrderedDict((n, o.float().cpu().numpy()) for n, o in zip(self.io.output_names, outputs))

    def deactivate_impl(self):
        self.module = None
