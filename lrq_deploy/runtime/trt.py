"""Serialized TensorRT engines (needs a CUDA GPU and TensorRT): loading with the build record
checked and the lrq plugins registered, and one inference on numpy inputs."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.errors import LrqError
from lrq_deploy.runtime.engine_record import check_build_record, read_build_record
from lrq_deploy.runtime.flavours import load_flavour


def load_engine(path: Path, flavour: str | None = None):
    """(flavour, engine) with the lrq plugins registered, so engines holding plugin layers load.
    The engine's build record (OUT.engine.json), where there is one, is checked first: an engine
    from another TensorRT version or for another GPU, or one changed since it was built, is
    refused with a message saying so instead of TensorRT's deserialization error."""
    import torch

    record = read_build_record(Path(path))
    loaded = load_flavour(flavour or (record or {}).get("flavour"))
    if record is not None:
        check_build_record(Path(path), record, loaded)
    if not torch.cuda.is_available():
        raise LrqError("running a TensorRT engine needs a CUDA GPU")
    from lrq_deploy.plugins.trt_plugins import register_plugins

    register_plugins(loaded.trt)
    trt = loaded.trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise LrqError(f"{path} is not a TensorRT engine for this GPU and TensorRT version")
    return loaded, engine


class EngineSession:
    """Run an engine on numpy inputs; returns its outputs as float32 numpy arrays."""

    def __init__(self, path: Path, flavour: str | None = None):
        import torch

        self.torch = torch
        self.record = read_build_record(Path(path))
        self.flavour, self.engine = load_engine(path, flavour)
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def io_names(self, mode: str) -> list[str]:
        wanted = getattr(self.flavour.trt.TensorIOMode, mode)
        return [n for n in self.names if self.engine.get_tensor_mode(n) == wanted]

    def input_dtype(self, name: str):
        return torch_dtype(self.torch, self.engine.get_tensor_dtype(name))

    def input_specs(self) -> list:
        """The engine's inputs as tensor specs, dynamic dims named as the source graph named them
        (recorded at build time in OUT.engine.json); an engine without a record gets the graph
        convention: batch first, the sequence second of input_ids, the cache length third of past.*."""
        from lrq_deploy.graph_io import BATCH_AXIS, PAST_AXIS, PAST_PREFIX, SEQ_AXIS, TensorSpec

        recorded = {name: dims for name, dims in (self.record or {}).get("inputs", [])}
        specs = []
        for name in self.io_names("INPUT"):
            dims = list(self.engine.get_tensor_shape(name))
            graph_dims = recorded.get(name)
            if graph_dims and len(graph_dims) == len(dims):
                named = {i: d for i, d in enumerate(graph_dims) if isinstance(d, str)}
            else:
                named = {0: BATCH_AXIS, 1: SEQ_AXIS} if name == "input_ids" else {0: BATCH_AXIS}
                if name.startswith(PAST_PREFIX):
                    named[2] = PAST_AXIS
            dims = tuple(named.get(i, 1) if d < 0 else d for i, d in enumerate(dims))
            specs.append(TensorSpec(name, str(self.input_dtype(name)).replace("torch.", ""), dims))
        return specs

    def run(self, feeds: dict) -> dict:
        torch = self.torch
        inputs = {name: torch.from_numpy(feeds[name]).to("cuda", self.input_dtype(name)).contiguous()
                  for name in self.io_names("INPUT")}
        outputs = bind(torch, self.flavour.trt, self.engine, self.context, inputs)
        stream = torch.cuda.Stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise LrqError("TensorRT could not run the engine")
        stream.synchronize()
        return {name: tensor.float().cpu().numpy() for name, tensor in outputs.items()}


def bind(torch, trt, engine, context, inputs: dict) -> dict:
    """Set the input shapes and addresses of `inputs` (device tensors), allocate the outputs at
    the shapes that follow, bind them; returns the output device tensors by name."""
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch_dtype(torch, engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    return outputs


def torch_dtype(torch, trt_dtype):
    name = str(trt_dtype).rsplit(".", 1)[-1].upper()
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    if name not in table:
        raise LrqError(f"engine I/O type {name} is not supported by the runner")
    return table[name]
