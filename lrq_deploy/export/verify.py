"""Verification of an exported graph: onnxruntime (graph optimizations off) against the torch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The default optimizer fuses DQ(int4) + MatMul into MatMulNBits, which is not bit-exact.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_against_torch(path: Path, loaded, limit: int | None = None, data_path: Path | None = None) -> dict:
    """Same inputs through onnxruntime and the torch reference: logit error, argmax agreement, metric."""
    adapter, model = loaded.adapter, loaded.model
    session = ort_session(path)
    input_name = session.get_inputs()[0].name
    inputs, labels = adapter.verification_set(loaded, data_path, limit, None)
    ref_logits, ort_logits = [], []
    for batch in inputs:
        ref_logits.append(adapter.graph_module(model)(batch).float())
        ort_logits.append(torch.from_numpy(session.run(None, {input_name: batch.numpy()})[0]).float())
    max_err = max((r - o).abs().max().item() for r, o in zip(ref_logits, ort_logits))
    agree = sum((r.argmax(-1) == o.argmax(-1)).sum().item() for r, o in zip(ref_logits, ort_logits))
    total = sum(r.argmax(-1).numel() for r in ref_logits)
    ref_metric = adapter.metric_from_logits(inputs, ref_logits, labels)
    ort_metric = adapter.metric_from_logits(inputs, ort_logits, labels)
    name = next(iter(ref_metric))
    return {
        "metric": name,
        "torch": ref_metric[name],
        "onnxruntime": ort_metric[name],
        "relative_difference": abs(ort_metric[name] - ref_metric[name]) / abs(ref_metric[name]),
        "max_abs_logit_error": max_err,
        "argmax_agreement": agree / total,
        "samples": int(sum(len(b) for b in inputs)),
        "onnxruntime_version": __import__("onnxruntime").__version__,
    }
