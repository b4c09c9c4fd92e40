"""trtexec-style benchmarking of engines, ONNX graphs and checkpoints; generation speed (--decode)."""

from lrq_deploy.bench.api import bench, bench_compare, bench_decode

__all__ = ["bench", "bench_compare", "bench_decode"]
