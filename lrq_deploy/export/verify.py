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


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length KV cache inputs: the with-past graph then runs as prefill."""
    feeds = {}
    for spec in session.get_inputs()[1:]:
        _, heads, _, head_dim = spec.shape
        feeds[spec.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return feeds


def ort_logits_fn(session):
    """inputs -> logits through an onnxruntime session (prefill with an empty cache for with-past graphs)."""
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        feeds = {input_name: batch.numpy(), **_empty_past(session, batch.shape[0])}
        return torch.from_numpy(session.run(None, feeds)[0]).float()

    return run


@torch.no_grad()
def verify_against_torch(path: Path, loaded, limit: int | None = None, with_past: bool = False,
                         static_shape: tuple[int | None, int | None] = (None, None)) -> dict:
    """Same inputs through onnxruntime and the torch reference: logit error, argmax agreement, metric.
    static_shape: the graph's fixed (batch, sequence length), where it has them."""
    adapter, model = loaded.adapter, loaded.model
    run_ort = ort_logits_fn(ort_session(path))
    reference = adapter.export_spec(model, None, None, False).module
    inputs, labels = adapter.verification_set(loaded, None, limit, *static_shape)
    ref_logits, ort_logits = [], []
    for batch in inputs:
        ref_logits.append(reference(batch).float())
        ort_logits.append(run_ort(batch))
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


@torch.no_grad()
def verify_generation(path: Path, loaded, prompt_len: int = 16, new_tokens: int = 8) -> dict:
    """Greedy decoding with the KV cache in onnxruntime (prefill, then one token at a time)
    against the torch reference: do both produce the same tokens?"""
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    inputs, _ = loaded.adapter.verification_set(loaded, None, 1)
    prompt = inputs[0][:1, :prompt_len]
    feeds = {"input_ids": prompt.numpy(), **_empty_past(session, 1)}
    ort_tokens = []
    for _ in range(new_tokens):
        outputs = dict(zip(names, session.run(None, feeds)))
        token = int(outputs["logits"][0, -1].argmax())
        ort_tokens.append(token)
        feeds = {"input_ids": np.array([[token]], dtype=np.int64)}
        feeds.update({n.replace("present.", "past."): v for n, v in outputs.items() if n.startswith("present.")})
    ref = loaded.model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    ref_tokens = ref[0, prompt_len:].tolist()
    return {"prompt_tokens": prompt_len, "onnxruntime": ort_tokens, "torch": ref_tokens, "match": ort_tokens == ref_tokens}
