"""The run directory: learned parameters saved per block as soon as each block finishes.

A run interrupted at any point (Ctrl-C, SIGKILL) resumes with `--resume`: finished blocks
are loaded instead of retrained, and because every block's training is seeded by
(seed, block index), the resumed run ends with the same checkpoint as an uninterrupted one.
Each file is written to a temporary name and renamed, so a kill never leaves a half-written
block that looks valid.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import torch

from lrq_deploy.atomic import atomic_write, check_output_dir, write_json
from lrq_deploy.errors import LrqError

RUN_FILE = "run.json"
REPORT_FILE = "report.json"
SCHEME_SEARCH_FILE = "scheme_search.json"
OWN_FILES = re.compile(r"(run\.json|report\.json|scheme_search\.json|losses\.png|block_\d{3}\.safetensors|\..*\.tmp-\d+)")


class RunDir:
    """Checked on construction (before any work); `start()` then creates or resumes it."""

    def __init__(self, path: Path, settings: dict, resume: bool, force: bool = False):
        self.path = Path(path)
        self.settings = settings
        self.resume = resume and (self.path / RUN_FILE).is_file()
        if self.path.exists() and not self.path.is_dir():
            raise LrqError(f"run directory {self.path} exists and is not a directory")
        if self.resume:
            _check_same_settings(self.path, read_settings(self.path / RUN_FILE), settings)
            self.records = self._read_records()
            return
        foreign = sorted(f.name for f in self.path.iterdir() if not OWN_FILES.fullmatch(f.name)) if self.path.is_dir() else []
        if foreign:
            raise LrqError(f"run directory {self.path} holds files lrq did not write ({', '.join(foreign[:3])}); "
                           "name another --run-dir")
        if (self.path / RUN_FILE).is_file() and not force:
            raise LrqError(f"run directory {self.path} holds an earlier run: continue it with --resume, "
                           "or start over with --force")
        check_output_dir(self.path, force=True)
        self.records: dict[int, dict] = {}

    def start(self) -> None:
        """Create the directory for a new run (replacing an old run's files), or keep a resumed one."""
        if self.resume:
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        try:
            write_json(self.path / RUN_FILE, self.settings)
        except OSError:  # a full disk, say: no run directory without its settings is left behind
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _block_file(self, index: int) -> Path:
        return self.path / f"block_{index:03d}.safetensors"

    def _read_records(self) -> dict[int, dict]:
        """Per block: loss_curve, and (runs since the training report) mse / cosine per epoch,
        best_epoch. Epoch 0 is the initialisation."""
        report = self.path / REPORT_FILE
        if not report.is_file():
            return {}
        try:
            data = read_json(report)
            curves = {int(k): [float(x) for x in v] for k, v in data["loss_curves"].items()}
            training = {int(k): dict(v) for k, v in data.get("training", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise LrqError(f"{report} is damaged; start over with --force (without --resume)") from None
        return {index: {**training.get(index, {}), "loss_curve": curve} for index, curve in curves.items()}

    def load_block(self, index: int) -> dict[str, torch.Tensor] | None:
        from lrq_deploy.tensor_files import read_safetensors

        file = self._block_file(index)
        if not file.is_file() or index not in self.records:
            return None
        return read_safetensors(file)

    def block_record(self, index: int) -> dict:
        return self.records[index]

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """The block's kept parameters and its training record (loss_curve, mse / cosine per epoch)."""
        from safetensors.torch import save_file

        try:
            atomic_write(self._block_file(index), lambda p: save_file(tensors, str(p)))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise LrqError(f"no space left on the device while saving block {index} to {self.path}; its "
                           f"{len(self.records)} finished blocks are kept: free space and continue with --resume") from None
        self.records[index] = record
        blocks = sorted(self.records.items())
        report = {"loss_curves": {str(k): r["loss_curve"] for k, r in blocks},
                  "training": {str(k): {n: v for n, v in r.items() if n != "loss_curve"} for k, r in blocks}}
        write_json(self.path / REPORT_FILE, report)
        self.plot()

    def save_scheme_search(self, record: dict) -> None:
        """The bit-budget search's table (calib/auto_scheme.py)."""
        write_json(self.path / SCHEME_SEARCH_FILE, record)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for index, record in sorted(self.records.items()):
            mse = record.get("mse_per_epoch")
            if mse:  # comparable across epochs and blocks: MSE to the FP block output, relative to the start
                ax.plot(range(len(mse)), [m / mse[0] for m in mse], label=f"block {index}")
            else:
                ax.plot(range(1, len(record["loss_curve"]) + 1), record["loss_curve"], label=f"block {index}")
        ax.set_xlabel("epoch (0: initialisation)")
        ax.set_ylabel("block output MSE / MSE at initialisation")
        ax.set_yscale("log")
        ax.legend(fontsize="small", ncol=2)
        fig.tight_layout()
        atomic_write(self.path / "losses.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LrqError(f"{file} is damaged ({exc}); start over with --force (without --resume)") from None
    if not isinstance(data, dict):
        raise LrqError(f"{file} is damaged (not a JSON object); start over with --force (without --resume)")
    return data


def saved_settings(path: Path) -> dict | None:
    """The settings a run directory was made with, or None when there is no run there."""
    file = Path(path) / RUN_FILE
    return read_settings(file) if file.is_file() else None


def read_settings(file: Path) -> dict:
    """A run's settings in today's full form: fields added since the run was made take the values
    the run was made with (symmetric activations, round-to-nearest rounding)."""
    from lrq_deploy.calib.registry import CalibConfig
    from lrq_deploy.quant.scheme import QuantScheme

    settings = read_json(file)
    try:
        if isinstance(settings.get("quant"), dict):
            settings["quant"] = QuantScheme.from_dict(settings["quant"]).to_dict()
        if isinstance(settings.get("calib"), dict):
            settings["calib"] = CalibConfig.from_dict(settings["calib"]).to_dict()
    except (TypeError, ValueError) as exc:
        raise LrqError(f"{file} is damaged ({exc}); start over with --force (without --resume)") from None
    return settings


def _check_same_settings(path: Path, saved: dict, settings: dict) -> None:
    differences = [
        f"{key}={saved_value!r} (now {value!r})"
        for key, saved_value, value in _flat_differences(saved, settings)
    ]
    if differences:
        raise LrqError(f"run directory {path} was made with {', '.join(differences[:4])}; "
                       "resume with the same settings, or start over with --force (without --resume)")


def _flat_differences(saved: dict, now: dict, prefix: str = ""):
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key not in saved and b in (None, False):
            continue  # a setting newer than the run, at its default: the run was made that way
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _flat_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b
