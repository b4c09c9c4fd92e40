"""Timed backends for `lrq bench`: timing on top of the runtime layer's session types (OrtSession,
TorchSession, EngineSession); each prepares its inputs once (the runtime's input generator, from
the session's input specs) and runs one inference per call.

Every runner reports, per inference, the host latency; CUDA runners also report GPU compute
time from CUDA events, and host-to-device / device-to-host copy times when the inputs and
outputs cross the bus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lrq_deploy.errors import LrqError
from lrq_deploy.runtime.inputs import benchmark_sizes, make_feeds

BACKENDS = ("ort", "torch", "trt")


@dataclass
class Timing:
    latency_ms: float
    compute_ms: float | None = None
    h2d_ms: float | None = None
    d2h_ms: float | None = None


@dataclass
class Workload:
    """What one inference processes, for throughput in items (tokens or images) per second."""

    description: str
    items_per_inference: int
    unit: str


def timed_on_cuda(torch, h2d, compute, d2h, stream=None) -> Timing:
    """Run the three steps (h2d / d2h may be None) between CUDA events on `stream` (default:
    the current stream); host latency covers all three and the synchronization."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    stream = stream or torch.cuda.current_stream()
    start = time.perf_counter()
    with torch.cuda.stream(stream):
        for event, step in zip(events, (h2d, compute, d2h)):
            event.record(stream)
            if step is not None:
                step()
        events[3].record(stream)
    stream.synchronize()
    latency = (time.perf_counter() - start) * 1e3
    h2d_ms, compute_ms, d2h_ms = (events[i].elapsed_time(events[i + 1]) for i in range(3))
    return Timing(latency, compute_ms, h2d_ms if h2d else None, d2h_ms if d2h else None)


class Runner:
    name = ""
    device = "cpu"

    def workload(self) -> Workload:
        raise NotImplementedError

    def infer(self) -> Timing:
        raise NotImplementedError


def _check_graph_shape(path: Path, ort, batch: int, seq_len: int) -> None:
    """Refuse shapes the graph cannot run: beyond the model's positions (recorded at export),
    or other than its static axes."""
    longest = ort.max_positions
    if longest and seq_len > longest:
        raise LrqError(f"--seq-len {seq_len} exceeds the {longest} positions of the model in {path}")
    first = ort.session.get_inputs()[0]
    wanted = [batch, seq_len] if first.name == "input_ids" and len(first.shape) == 2 else [batch]
    for axis, (dim, value) in enumerate(zip(first.shape, wanted)):
        if isinstance(dim, int) and dim != value:
            fixed = "x".join(str(d) for d in first.shape)
            raise LrqError(f"{path} has static input shape {fixed}; axis {axis} is {dim}, not {value} "
                           "(set --batch / --seq-len to match, or export with dynamic axes)")


class OrtRunner(Runner):
    """A graph in onnxruntime as deployed (runtime.onnxrt.deployed_session)."""

    name = "ort"

    def __init__(self, path: Path, batch: int, seq_len: int, optimize: bool = True, device: str = "auto"):
        from lrq_deploy.runtime.onnxrt import OrtSession

        ort = OrtSession(path, optimize=optimize, device=device)
        self.session, self.device = ort.session, ort.device
        _check_graph_shape(path, ort, batch, seq_len)
        specs = ort.input_specs()
        sizes, description, items, unit = benchmark_sizes(specs, batch, seq_len)
        self.feeds = make_feeds(specs, sizes)
        self._workload = Workload(description, items, unit)

    def workload(self) -> Workload:
        return self._workload

    def infer(self) -> Timing:
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        return Timing(latency_ms=(time.perf_counter() - start) * 1e3)


class TorchRunner(Runner):
    """A checkpoint or full-precision model in PyTorch (Triton kernels on CUDA where they serve it)."""

    name = "torch"

    def __init__(self, path: Path, batch: int, seq_len: int, device: str = "auto", transfers: bool = True):
        import torch

        from lrq_deploy.devices import resolve_device
        from lrq_deploy.runtime.torch_models import TorchSession, load_torch_target

        self.torch = torch
        dev = resolve_device(device)
        self.device = dev.type
        target = load_torch_target(path, dev)
        session = TorchSession(target.loaded, dev, batch=batch, seq_len=seq_len)
        self.module = session.module
        specs = session.input_specs()
        sizes, description, items, unit = benchmark_sizes(specs, batch, seq_len)
        self.host_inputs = tuple(torch.from_numpy(a) for a in make_feeds(specs, sizes).values())
        self.inputs = tuple(t.to(dev) for t in self.host_inputs)
        self.transfers = transfers and dev.type == "cuda"
        self._workload = Workload(f"{description}, {target.path_name}", items, unit)

    def workload(self) -> Workload:
        return self._workload

    def infer(self) -> Timing:
        torch = self.torch
        with torch.no_grad():
            if self.device != "cuda":
                start = time.perf_counter()
                self.module(*self.inputs)
                return Timing(latency_ms=(time.perf_counter() - start) * 1e3)
            state = {"inputs": self.inputs}

            def h2d():
                state["inputs"] = tuple(t.to("cuda", non_blocking=True) for t in self.host_inputs)

            def compute():
                state["out"] = self.module(*state["inputs"])

            def d2h():
                state["out"].to("cpu", non_blocking=True)

            return timed_on_cuda(torch, h2d if self.transfers else None, compute, d2h if self.transfers else None)


class TrtRunner(Runner):
    """A serialized engine: pinned host buffers, device buffers bound once, CUDA-event timing."""

    name = "trt"
    device = "cuda"

    def __init__(self, path: Path, batch: int, seq_len: int, transfers: bool = True, flavour: str | None = None):
        import torch

        from lrq_deploy.runtime.trt import EngineSession, bind

        self.torch = torch
        session = EngineSession(path, flavour)
        self.engine, self.context = session.engine, session.context
        self.stream = torch.cuda.Stream()
        self.transfers = transfers
        specs = session.input_specs()
        sizes, description, items, unit = benchmark_sizes(specs, batch, seq_len)
        feeds = make_feeds(specs, sizes)
        self.inputs = {}
        for name, array in feeds.items():
            host = torch.from_numpy(array).to(session.input_dtype(name))
            self.inputs[name] = (host.pin_memory(), host.cuda())
        devices = bind(torch, session.flavour.trt, self.engine, self.context,
                       {name: device for name, (_, device) in self.inputs.items()})
        self.outputs = {name: (torch.empty(device.shape, dtype=device.dtype, pin_memory=True), device)
                        for name, device in devices.items()}
        self._workload = Workload(f"engine, {description}", items, unit)

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


def detect_backend(target: Path) -> tuple[str, Path]:
    """(the backend that runs `target`, the file or directory it opens)."""
    from lrq_deploy.artifacts import Kind, resolve_artifact

    kind, path = resolve_artifact(target, "benchmark target")
    return {Kind.CHECKPOINT: "torch", Kind.ONNX: "ort", Kind.ENGINE: "trt"}[kind], path


def make_runner(target: Path, backend: str | None, batch: int, seq_len: int, device: str, transfers: bool) -> Runner:
    detected, target = detect_backend(target)
    backend = backend or detected
    if backend == "ort":
        return OrtRunner(target, batch, seq_len, device=device)
    if backend == "torch":
        return TorchRunner(target, batch, seq_len, device, transfers)
    if backend == "trt":
        if device == "cpu":
            raise LrqError("TensorRT engines run on a CUDA GPU; --device cpu applies to the ort and torch backends")
        return TrtRunner(target, batch, seq_len, transfers)
    raise LrqError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
