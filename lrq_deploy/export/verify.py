"""Verification of an exported graph: onnxruntime (graph optimizations off) against the torch
reference on the adapter's verification set, through the runtime layer's runners and comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lrq_deploy.runtime.compare import compare_runs, run_iterations
from lrq_deploy.runtime.onnxrt import declares_int8_activations, deployed_session, next_past, reference_session, step_feeds
from lrq_deploy.runtime.runners import TorchRunner, ort_runner


# What a graph must show against the torch reference to be "within tolerance". The graph computes
# the calibrated numerics exactly (integer codes, same scales); what differs is float work: GEMM
# accumulation order, and for activation-quantized layers an activation that lands on a rounding
# boundary flips one code. Those move single logits by up to a few percent of their range (the
# largest logit error alone says little), so the figures that matter are the model's metric, the
# argmax and the cosine over all outputs. onnxruntime's int8-activation MatMulNBits (accuracy
# level 4) runs other numerics by design: its bounds are wider.
# Activations quantized per token at 4-8 bits: each code that flips moves its activation by a
# whole step (a seventh of the token's range at 4 bits), so the argmax of a few percent of tokens
# may follow; the metric and the cosine stay as tight (measured: a W4A4 LRQuant+ graph of the
# bundled model, 16 windows: argmax 99.1%, perplexity 4e-4 apart; its first 2 windows: 95.7%).
TOLERANCE = {"relative_difference": 0.01, "argmax_agreement": 0.99, "cosine": 0.999}
TOLERANCE_QUANTIZED_ACTIVATIONS = {**TOLERANCE, "argmax_agreement": 0.95}
TOLERANCE_INT8_ACTIVATIONS = {"relative_difference": 0.05, "argmax_agreement": 0.9, "cosine": 0.99}


@torch.no_grad()
def verify_against_torch(path: Path, loaded, limit: int | None = None, with_past: bool = False,
                         static_shape: tuple[int | None, int | None] = (None, None),
                         quantized_activations: bool = False) -> dict:
    """Same inputs through onnxruntime and the torch reference: the logits compared (Polygraphy's
    error statistics, cosine, argmax agreement) and the model's metric on both.
    static_shape: the graph's fixed (batch, sequence length), where it has them; quantized_activations:
    the checkpoint quantizes activations (TOLERANCE_QUANTIZED_ACTIVATIONS)."""
    adapter = loaded.adapter
    inputs, labels = adapter.verification_set(loaded, None, limit, *static_shape)
    io = adapter.graph_io(loaded.model)
    feeds = [feed_of(io.input_names, batch) for batch in inputs]
    output = io.output_names[0]
    reference = run_iterations(TorchRunner(loaded, "cpu", name="torch"), feeds)
    session = reference_session(path)
    int8_activations = declares_int8_activations(session)
    if int8_activations:  # verified with the numerics it declares, as deployed
        session = deployed_session(path, device="cpu")
    if with_past:
        feeds = [step_feeds(session, feed["input_ids"]) for feed in feeds]
    candidate = [{output: out[output]} for out in run_iterations(ort_runner(path, session=session), feeds)]
    comparison = compare_runs(("torch", reference), ("onnxruntime", candidate), atol=1e-3, rtol=1e-3)[output]
    metric = {side: adapter.metric_from_logits(inputs, [torch.from_numpy(o[output]) for o in outs], labels)
              for side, outs in (("torch", reference), ("onnxruntime", candidate))}
    key = next(iter(metric["torch"]), None)  # None: outputs compared directly (embeddings)
    relative = (abs(metric["onnxruntime"][key] - metric["torch"][key]) / abs(metric["torch"][key])
                if key else 1.0 - comparison["cosine"])
    tolerance = (TOLERANCE_INT8_ACTIVATIONS if int8_activations else
                 TOLERANCE_QUANTIZED_ACTIVATIONS if quantized_activations else TOLERANCE)
    return {
        "metric": key,
        "torch": metric["torch"].get(key),
        "onnxruntime": metric["onnxruntime"].get(key),
        "relative_difference": relative,
        "tolerance": tolerance,
        "within_tolerance": bool(relative <= tolerance["relative_difference"]
                                 and comparison["argmax_agreement"] >= tolerance["argmax_agreement"]
                                 and comparison["cosine"] >= tolerance["cosine"]),
        "output": output,
        "max_abs_logit_error": comparison["max_abs_error"],
        "argmax_agreement": comparison["argmax_agreement"],
        "logits": comparison,
        "onnxruntime_numerics": ("MatMulNBits accuracy level 4: activations rounded to int8 per block of K"
                                 if int8_activations else "the graph as written (optimizations off)"),
        "samples": int(sum(len(b) for b in inputs)),
        "onnxruntime_version": __import__("onnxruntime").__version__,
    }


def verification_line(verify: dict) -> str:
    """The figures that judge a graph against torch, and the tolerance they were held to."""
    c, tol = verify["logits"], verify["tolerance"]
    what = (f"{verify['metric']} differs by {verify['relative_difference']:.2g} (relative)" if verify["metric"]
            else f"1 - cosine {verify['relative_difference']:.2g}")
    share = c["max_abs_error"] / c["reference_max_abs"] if c.get("reference_max_abs") else float("nan")
    verdict = "within tolerance" if verify["within_tolerance"] else "OUTSIDE tolerance"
    return (f"onnxruntime vs torch over {verify['samples']} samples: {what}, argmax agreement "
            f"{c['argmax_agreement']:.2%}, cosine {c['cosine']:.6f}, largest {verify['output']} error "
            f"{c['max_abs_error']:.3g} ({share:.2%} of the largest {verify['output']} value): {verdict} "
            f"({'metric' if verify['metric'] else '1 - cosine'} <= {tol['relative_difference']:.0%}, argmax >= "
            f"{tol['argmax_agreement']:.0%}, cosine >= {tol['cosine']})")


def feed_of(names: list[str], batch) -> dict:
    """A graph's feed from one verification batch: a tensor (one input) or a tuple (one per input)."""
    tensors = batch if isinstance(batch, tuple) else (batch,)
    return {name: tensor.numpy() for name, tensor in zip(names, tensors)}


@torch.no_grad()
def verify_generation(path: Path, loaded, prompt_len: int = 16, new_tokens: int = 8) -> dict:
    """Greedy decoding with the KV cache in onnxruntime (prefill, then one token at a time)
    against the torch reference: do both produce the same tokens?"""
    session = reference_session(path)
    names = [o.name for o in session.get_outputs()]
    prompt = verification_prompt(loaded, prompt_len)
    feeds = step_feeds(session, prompt.numpy())
    ort_tokens = []
    for _ in range(new_tokens):
        outputs = dict(zip(names, session.run(None, feeds)))
        token = int(outputs["logits"][0, -1].argmax())
        ort_tokens.append(token)
        feeds = step_feeds(session, np.array([[token]], dtype=np.int64), next_past(outputs))
    ref_tokens = torch_greedy(loaded, prompt, new_tokens)
    return {"prompt_tokens": prompt_len, "onnxruntime": ort_tokens, "torch": ref_tokens, "match": ort_tokens == ref_tokens}


def verification_prompt(loaded, prompt_len: int = 16) -> torch.Tensor:
    """A (1, prompt_len) prompt: the start of the adapter's first verification window."""
    inputs, _ = loaded.adapter.verification_set(loaded, None, 1)
    return inputs[0][:1, :prompt_len]


@torch.no_grad()
def torch_greedy(loaded, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The torch reference's greedy continuation of `prompt`: exactly new_tokens tokens (an
    end-of-sequence token does not stop it, as it does not stop the graphs compared with it)."""
    out = loaded.model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return out[0, prompt.shape[1]:].tolist()
