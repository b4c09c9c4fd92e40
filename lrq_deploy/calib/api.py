"""Public entry point of the calibrate stage: model spec in, quantized checkpoint out."""

from __future__ import annotations

from pathlib import Path

import torch

from lrq_deploy.calib import baselines  # noqa: F401  (registers rtn, smoothquant)
from lrq_deploy.calib.engine import calibrate_model
from lrq_deploy.checkpoint import check_output_dir, save_checkpoint
from lrq_deploy.config import CalibConfig, QuantConfig
from lrq_deploy.errors import LrqError
from lrq_deploy.models import load_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LrqError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise LrqError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def calibrate(
    model_spec: str | None,
    out: Path,
    qconfig: QuantConfig,
    cconfig: CalibConfig,
    calib_data: Path | None = None,
    device: str = "auto",
    force: bool = False,
    progress=None,
) -> dict:
    """Quantize a model with the configured method and write the checkpoint to `out`.

    Returns a summary: per-block errors and the checkpoint path.
    """
    check_output_dir(Path(out), force)
    dev = resolve_device(device)
    torch.manual_seed(cconfig.seed)
    loaded = load_model(model_spec, dev)
    batches = loaded.adapter.calibration_batches(loaded, calib_data, cconfig.nsamples, cconfig.seqlen, cconfig.seed)
    result = calibrate_model(loaded, qconfig, cconfig, batches, dev, progress=progress)
    loaded.model.cpu()
    save_checkpoint(Path(out), loaded, result.model, result.quantized, qconfig, cconfig, result.blocks, force=force)
    return {"checkpoint": str(out), "blocks": result.blocks}
