"""Evaluate a quantized checkpoint next to the full-precision model it came from."""

from __future__ import annotations

from pathlib import Path

from lrq_deploy.config import QuantConfig
from lrq_deploy.errors import LrqError


def evaluate_checkpoint(
    path: Path, task: str | None = None, data: Path | None = None, limit: int | None = None, device: str = "auto",
    compare_fp: bool = True, backend: str = "reference", seq_len: int | None = None,
) -> dict:
    """Return {"task", "fp": {metric: value} (None when compare_fp is off), "quant": {metric: value}}."""
    from lrq_deploy.devices import resolve_device
    from lrq_deploy.runtime.torch_models import load_torch_target

    if limit is not None and limit < 1:
        raise LrqError(f"--limit must be >= 1, got {limit}")
    if backend not in ("reference", "torch"):
        raise LrqError(f"backend must be reference or torch, got {backend!r}")
    dev = resolve_device(device)
    quant = load_torch_target(Path(path), dev, kernels="require" if backend == "torch" else "never", checkpoint=True)
    adapter, manifest = quant.loaded.adapter, quant.manifest
    if task is not None and task != adapter.default_metric:
        raise LrqError(f"task {task!r} does not apply to a {adapter.task} model (use {adapter.default_metric})")
    fp = load_torch_target(manifest["source"], dev).loaded if compare_fp else None
    return {
        "task": adapter.default_metric,
        "backend": backend,
        "scenario": f"{manifest['calib']['method']} {QuantConfig.from_dict(manifest['quant']).scenario}",
        "fp": adapter.evaluate(fp.model, fp, data, limit, dev, seq_len) if fp else None,
        "quant": adapter.evaluate(quant.loaded.model, quant.loaded, data, limit, dev, seq_len),
    }
