"""ONNX export of quantized checkpoints (QDQ graphs for onnxruntime, plugin nodes for TensorRT)."""

from lrq_deploy.export.onnx_export import TARGETS, ExportOptions, export_onnx

__all__ = ["TARGETS", "ExportOptions", "export_onnx"]
