"""ONNX export of quantized checkpoints (QDQ graphs for onnxruntime, plugin nodes for TensorRT)."""

from lrq_deploy.export.onnx_export import TARGETS, export_onnx

__all__ = ["TARGETS", "export_onnx"]
