"""Evaluate a quantized checkpoint next to the full-precision model it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lrq_deploy.data import check_readable_data
from lrq_deploy.errors import LrqError
from lrq_deploy.progress import step

BACKENDS = ("reference", "torch")


@dataclass(frozen=True)
class EvalOptions:
    """What to measure and how; validated on construction.

    metric: the metric (None: the model's own). data: evaluation text (None: WikiText-2 test).
    limit: at most this many windows / images. backend: "reference" (QuantLinear arithmetic) or
    "torch" (the Triton kernels, refused where no kernel serves the scheme). seq_len: perplexity
    window. compare_fp: also evaluate the full-precision source model."""

    metric: str | None = None
    data: Path | None = None
    limit: int | None = None
    device: str = "auto"
    compare_fp: bool = True
    backend: str = "reference"
    seq_len: int | None = None
    fp_cache: bool = True  # read / keep the full-precision figure (eval/fp_cache.py)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise LrqError(f"--limit must be >= 1, got {self.limit}")
        if self.backend not in BACKENDS:
            raise LrqError(f"backend must be {' or '.join(BACKENDS)}, got {self.backend!r}")


def evaluate_checkpoint(path: Path, options: EvalOptions | None = None, **settings) -> dict:
    """Return {"metric", "backend", "method", "scheme", "fp": {metric: value} (None when compare_fp is off),
    "fp_cached": whether the FP figure was read from the cache, "quant": {metric: value}, and, for families
    judged by their outputs (ViT, encoders), "agreement": cosine / top-1 agreement of FP and quantized
    outputs row by row}. `settings` are EvalOptions fields, for callers without an object."""
    from lrq_deploy.devices import resolve_device
    from lrq_deploy.eval import fp_cache
    from lrq_deploy.metrics import output_agreement

    options = options or EvalOptions(**settings)
    if options.data is not None:
        check_readable_data(Path(options.data))
    dev = resolve_device(options.device)
    ckpt = load_for_eval(path, dev, options.backend)
    adapter = ckpt.adapter
    if options.metric is not None and options.metric != adapter.default_metric:
        raise LrqError(f"metric {options.metric!r} does not apply to a {adapter.task} model (use {adapter.default_metric})")

    def metric(model, source):
        return adapter.evaluate(model, source, options.data, options.limit, dev, options.seq_len)

    def outputs(model, source):
        return adapter.agreement_outputs(model, source, options.data, options.limit, dev)

    result = {"metric": adapter.default_metric, "backend": options.backend, "method": ckpt.method,
              "scheme": ckpt.scheme_name, "fp": None, "fp_cached": False}
    if adapter.compares_outputs and not options.compare_fp:
        raise LrqError(f"a {adapter.task} model is measured against its full-precision outputs; keep compare_fp on")
    key = (fp_cache.fp_key(ckpt.source, options.data, _fp_settings(options, adapter, dev))
           if options.compare_fp and options.fp_cache and not adapter.compares_outputs else None)
    cached = fp_cache.read_fp(key)
    if cached is not None:
        result.update(fp=cached, fp_cached=True)
    elif options.compare_fp:
        with step("loading the full-precision model"):
            fp = ckpt.full_precision_source(dev).loaded
        result["fp"] = metric(fp.model, fp)
        fp_cache.write_fp(key, result["fp"])
        if adapter.compares_outputs:
            reference = outputs(fp.model, fp)
            result["agreement"] = output_agreement(reference, outputs(ckpt.model, ckpt.loaded), adapter.agreement_argmax)
        del fp
    result["quant"] = metric(ckpt.model, ckpt.loaded)
    return result


def load_for_eval(path: Path, device, backend: str):
    """The checkpoint at `path` on `device`, its quantized linears on the reference arithmetic or
    (backend "torch") the Triton kernels."""
    from lrq_deploy.runtime.torch_models import load_torch_target

    kernels = "require" if backend == "torch" else "never"
    return load_torch_target(Path(path), device, kernels=kernels, checkpoint=True).checkpoint


def _fp_settings(options: EvalOptions, adapter, device) -> dict:
    return {"family": adapter.family, "metric": adapter.default_metric, "limit": options.limit,
            "seq_len": options.seq_len, "device": device.type}
