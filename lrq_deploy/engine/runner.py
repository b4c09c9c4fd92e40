"""Running serialized engines (needs a CUDA GPU and TensorRT): `EngineSession` for one inference
on given inputs (build-engine --verify), `TrtRunner` for `lrq bench --backend trt`."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.bench.runners import Runner, Timing, Workload, timed_on_cuda
from lrq_deploy.engine.flavours import load_flavour
from lrq_deploy.engine.record import check_build_record, read_build_record
from lrq_deploy.errors import LrqError


def load_engine(path: Path, flavour: str | None = None):
    """(flavour, engine) with the lrq plugins registered, so engines holding plugin layers load.
    The engine's build record (OUT.json), where there is one, is checked first: an engine from
    another TensorRT version or for another GPU, or one changed since it was built, is refused
    with a message saying so instead of TensorRT's deserialization error."""
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
    """Run an engine on numpy inputs; returns its outputs as numpy arrays."""

    def __init__(self, path: Path, flavour: str | None = None):
        import torch

        self.torch = torch
        self.flavour, self.engine = load_engine(path, flavour)
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def run(self, feeds: dict) -> dict:
        torch, trt = self.torch, self.flavour.trt
        inputs = {name: torch.from_numpy(feeds[name]).to("cuda", _torch_dtype(torch, self.engine.get_tensor_dtype(name))).contiguous()
                  for name in self.names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT}
        outputs = _bind(torch, trt, self.engine, self.context, inputs)
        stream = torch.cuda.Stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise LrqError("TensorRT could not run the engine")
        stream.synchronize()
        return {name: tensor.float().cpu().numpy() for name, tensor in outputs.items()}


class TrtRunner(Runner):
    name = "trt"
    device = "cuda"

    def __init__(self, path: Path, batch: int, seq_len: int, transfers: bool = True, flavour: str | None = None):
        import torch

        self.torch = torch
        self.flavour, self.engine = load_engine(path, flavour)
        trt = self.flavour.trt
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.transfers = transfers
        self.inputs = {}
        items, unit = batch, "images"
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = self._input_shape(name, batch, seq_len)
                dtype = _torch_dtype(torch, self.engine.get_tensor_dtype(name))
                host = (torch.randint(0, 100, shape) if name == "input_ids" else torch.randn(shape)).to(dtype)
                self.inputs[name] = (host.pin_memory(), host.cuda())
                if name == "input_ids":
                    items, unit = host.numel(), "tokens"
        devices = _bind(torch, trt, self.engine, self.context, {name: device for name, (_, device) in self.inputs.items()})
        self.outputs = {name: (torch.empty(device.shape, dtype=device.dtype, pin_memory=True), device)
                        for name, device in devices.items()}
        self._workload = Workload(f"engine, batch {batch}", items, unit)

    def _input_shape(self, name: str, batch: int, seq_len: int) -> tuple[int, ...]:
        dims = list(self.engine.get_tensor_shape(name))
        fill = {0: batch}
        if name == "input_ids":
            fill[1] = seq_len
        return tuple(fill.get(i, 1 if d < 0 else d) if d < 0 else d for i, d in enumerate(dims))

    def workload(self) -> Workload:
        return self._workload

    def infer(self) -> Timing:
        def h2d():
            for host, device in self.inputs.values():
                device.copy_(host, non_blocking=True)

        def compute():
            self.context.execute_async_v3(self.stream.cuda_stream)

        def d2h():
            for host, device in self.outputs.values():
                host.copy_(device, non_blocking=True)

        transfers = self.transfers
        return timed_on_cuda(self.torch, h2d if transfers else None, compute, d2h if transfers else None, self.stream)


def _bind(torch, trt, engine, context, inputs: dict) -> dict:
    """Set the input shapes and addresses of `inputs` (device tensors), allocate the outputs at
    the shapes that follow, bind them; returns the output device tensors by name."""
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = _torch_dtype(torch, engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    return outputs


def _torch_dtype(torch, trt_dtype):
    name = str(trt_dtype).rsplit(".", 1)[-1].upper()
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    if name not in table:
        raise LrqError(f"engine I/O type {name} is not supported by the benchmark runner")
    return table[name]

