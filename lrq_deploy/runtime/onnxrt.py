"""onnxruntime sessions: the reference (optimizations off, CPU) and as deployed."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.errors import LrqError

MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def reference_session(path: Path):
    """Graph optimizations off, CPU: the optimizer would fuse DQ(int4) + MatMul into
    MatMulNBits, which is not bit-exact; verification compares the graph as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return _session(path, options, ["CPUExecutionProvider"])


def deployed_session(path: Path, optimize: bool = True, device: str = "auto"):
    """As deployed: graph optimizations on; every available provider (auto), the CPU only
    (cpu), or CUDA, refused when onnxruntime has no CUDA provider (cuda)."""
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
    return _session(path, options, providers)


def _session(path: Path, options, providers):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise LrqError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


def graph_metadata(session) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)
