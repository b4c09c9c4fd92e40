"""Public entry point of the calibrate stage: model spec in, quantized checkpoint out."""

from __future__ import annotations

from pathlib import Path

import torch

from lrq_deploy.calib import baselines, learnable  # noqa: F401  (register the methods)
from lrq_deploy.calib.engine import calibrate_model
from lrq_deploy.calib.learnable import RECIPES
from lrq_deploy.calib.rundir import RunDir
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
    run_dir: Path | None = None,
    resume: bool = False,
    offload: bool = False,
) -> dict:
    """Quantize a model with the configured method and write the checkpoint to `out`.

    offload keeps the model and block inputs in CPU memory, one block at a time on the device.
    Learnable methods keep their per-block parameters in `run_dir` (default: OUT.run), so an
    interrupted run continues with resume=True. Returns the checkpoint path and per-block errors.
    """
    out = Path(out)
    check_output_dir(out, force)
    dev = resolve_device(device)
    torch.manual_seed(cconfig.seed)
    loaded = load_model(model_spec, "cpu" if offload else dev)
    batches = loaded.adapter.calibration_batches(loaded, calib_data, cconfig.nsamples, cconfig.seqlen, cconfig.seed)
    runs = None
    if cconfig.method in RECIPES:
        settings = {"model": loaded.spec, "quant": qconfig.to_dict(), "calib": cconfig.to_dict(),
                    "calib_data": str(calib_data) if calib_data else None}
        runs = RunDir(run_dir or out.with_name(out.name + ".run"), settings, resume)
    result = calibrate_model(loaded, qconfig, cconfig, batches, dev, progress=progress, run_dir=runs, offload=offload)
    loaded.model.cpu()
    save_checkpoint(out, loaded, result.model, result.quantized, qconfig, cconfig, result.blocks, force=force)
    return {"checkpoint": str(out), "blocks": result.blocks, "run_dir": str(runs.path) if runs else None}
