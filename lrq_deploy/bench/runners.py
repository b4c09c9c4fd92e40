"""Backends for `lrq bench`. A runner prepares inputs once and runs one inference per call.

Every runner reports, per inference, the host latency; CUDA runners also report GPU compute
time from CUDA events, and host-to-device / device-to-host copy times when the inputs and
outputs cross the bus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrq_deploy.errors import LrqError

BACKENDS = ("ort", "torch", "trt")
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


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


def _input_feeds(inputs, batch: int, seq_len: int) -> tuple[dict[str, np.ndarray], Workload]:
    """Random inputs for an ONNX graph: token ids (prefill, or one decode step over a KV cache
    of seq_len tokens when the graph has past inputs) or images."""
    rng = np.random.default_rng(0)
    names = [i.name for i in inputs]
    first = inputs[0]
    if first.name == "input_ids":
        has_past = any(n.startswith("past.") for n in names)
        new_tokens = 1 if has_past else seq_len
        feeds = {"input_ids": rng.integers(0, 100, (batch, new_tokens), dtype=np.int64)}
        for spec in inputs[1:]:
            _, heads, _, head_dim = spec.shape
            feeds[spec.name] = rng.standard_normal((batch, heads, seq_len, head_dim), dtype=np.float32)
        if has_past:
            return feeds, Workload(f"decode step, batch {batch}, KV cache {seq_len}", batch, "tokens")
        return feeds, Workload(f"prefill, batch {batch} x {seq_len} tokens", batch * seq_len, "tokens")
    shape = [batch] + [d if isinstance(d, int) else 1 for d in first.shape[1:]]
    feeds = {first.name: rng.standard_normal(shape, dtype=np.float32)}
    return feeds, Workload(f"batch {batch} images {tuple(shape[1:])}", batch, "images")


def _check_graph_shape(path: Path, session, batch: int, seq_len: int) -> None:
    """Refuse shapes the graph cannot run: beyond the model's positions (recorded at export),
    or other than its static axes."""
    longest = session.get_modelmeta().custom_metadata_map.get("lrq.max_seq_len")
    if longest and seq_len > int(longest):
        raise LrqError(f"--seq-len {seq_len} exceeds the {longest} positions of the model in {path}")
    first = session.get_inputs()[0]
    wanted = [batch, seq_len] if first.name == "input_ids" and len(first.shape) == 2 else [batch]
    for axis, (dim, value) in enumerate(zip(first.shape, wanted)):
        if isinstance(dim, int) and dim != value:
            fixed = "x".join(str(d) for d in first.shape)
            raise LrqError(f"{path} has static input shape {fixed}; axis {axis} is {dim}, not {value} "
                           "(set --batch / --seq-len to match, or export with dynamic axes)")


def ort_benchmark_session(path: Path, optimize: bool = True, device: str = "auto"):
    """An onnxruntime session as deployed: graph optimizations on; every available provider
    (auto), the CPU only (cpu), or CUDA, refused when onnxruntime has no CUDA provider (cuda)."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        if "CUDAExecutionProvider" not in providers:
            raise LrqError("--device cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu, "
                           "or lrq-deploy[trt])")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The optimizer fuses INT4/INT2 DequantizeLinear + MatMul into MatMulNBits, by default at
    # accuracy level 4 (activations rounded to int8): another model. Level 1 computes in fp32.
    options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, "1")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise LrqError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


class OrtRunner(Runner):
    name = "ort"

    def __init__(self, path: Path, batch: int, seq_len: int, optimize: bool = True, device: str = "auto"):
        self.session = ort_benchmark_session(path, optimize, device)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        _check_graph_shape(path, self.session, batch, seq_len)
        self.feeds, self._workload = _input_feeds(self.session.get_inputs(), batch, seq_len)

    def workload(self) -> Workload:
        return self._workload

    def infer(self) -> Timing:
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        return Timing(latency_ms=(time.perf_counter() - start) * 1e3)


class TorchRunner(Runner):
    """A quantized checkpoint on the torch backend (reference QuantLinear path)."""

    name = "torch"

    def __init__(self, path: Path, batch: int, seq_len: int, device: str = "auto", transfers: bool = True):
        import torch

        from lrq_deploy.calib.api import resolve_device
        from lrq_deploy.checkpoint import load_checkpoint

        self.torch = torch
        dev = resolve_device(device)
        self.device = dev.type
        loaded, manifest = load_checkpoint(path, dev)
        self.kernels = use_kernels_if_served(loaded.model, manifest)
        spec = loaded.adapter.export_spec(loaded.model, batch, seq_len, with_past=False)
        self.module = spec.module.eval()
        self.host_inputs = spec.example_args
        self.inputs = tuple(t.to(dev) for t in spec.example_args)
        self.transfers = transfers and dev.type == "cuda"
        items = spec.example_args[0].numel() if spec.input_names[0] == "input_ids" else batch
        unit = "tokens" if spec.input_names[0] == "input_ids" else "images"
        path_name = "Triton kernels" if self.kernels else "reference dequantize + matmul"
        self._workload = Workload(f"{spec.input_names[0]} {tuple(spec.example_args[0].shape)}, {path_name}", items, unit)

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


def use_kernels_if_served(model, manifest) -> bool:
    """Put the model on the Triton kernels when they serve its configuration."""
    from lrq_deploy.config import QuantConfig
    from lrq_deploy.plugins.backend import use_kernels
    from lrq_deploy.quant.scheme import QuantScheme

    if QuantScheme.from_config(QuantConfig.from_dict(manifest["quant"])).kernel is None:
        return False
    use_kernels(model)
    return True


def detect_backend(target: Path) -> str:
    if target.is_dir():
        return "torch"
    if target.suffix == ".onnx":
        return "ort"
    if target.suffix in (".engine", ".plan", ".trt"):
        return "trt"
    raise LrqError(f"cannot tell the backend of {target}: name an .onnx file, an .engine file or a checkpoint directory")


def make_runner(target: Path, backend: str | None, batch: int, seq_len: int, device: str, transfers: bool) -> Runner:
    target = Path(target)
    if not target.exists():
        raise LrqError(f"benchmark target {target} does not exist")
    backend = backend or detect_backend(target)
    if backend == "ort":
        return OrtRunner(target, batch, seq_len, device=device)
    if backend == "torch":
        return TorchRunner(target, batch, seq_len, device, transfers)
    if backend == "trt":
        from lrq_deploy.engine import TrtRunner

        if device == "cpu":
            raise LrqError("TensorRT engines run on a CUDA GPU; --device cpu applies to the ort and torch backends")
        return TrtRunner(target, batch, seq_len, transfers)
    raise LrqError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
