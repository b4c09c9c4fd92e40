"""trtexec-style benchmarking of engines, ONNX graphs and checkpoints."""

from lrq_deploy.bench.api import bench, bench_compare

__all__ = ["bench", "bench_compare"]
