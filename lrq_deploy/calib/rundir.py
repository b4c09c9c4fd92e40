"""The run directory: learned parameters saved per block as soon as each block finishes.

A run interrupted at any point (Ctrl-C, SIGKILL) resumes with `--resume`: finished blocks
are loaded instead of retrained, and because every block's training is seeded by
(seed, block index), the resumed run ends with the same checkpoint as an uninterrupted one.
Each file is written to a temporary name and renamed, so a kill never leaves a half-written
block that looks valid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lrq_deploy.atomic import atomic_write, write_json
from lrq_deploy.errors import LrqError

RUN_FILE = "run.json"


class RunDir:
    def __init__(self, path: Path, settings: dict, resume: bool):
        self.path = Path(path)
        if resume and (self.path / RUN_FILE).is_file():
            saved = json.loads((self.path / RUN_FILE).read_text())
            if saved != settings:
                raise LrqError(f"run directory {self.path} was made with other settings; rerun without --resume to start over")
        else:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            write_json(self.path / RUN_FILE, settings)
        self.curves: dict[int, list[float]] = self._read_curves()

    def _block_file(self, index: int) -> Path:
        return self.path / f"block_{index:03d}.safetensors"

    def _read_curves(self) -> dict[int, list[float]]:
        report = self.path / "report.json"
        if not report.is_file():
            return {}
        return {int(k): v for k, v in json.loads(report.read_text())["loss_curves"].items()}

    def load_block(self, index: int) -> dict[str, torch.Tensor] | None:
        from lrq_deploy.checkpoint import read_safetensors

        file = self._block_file(index)
        if not file.is_file() or index not in self.curves:
            return None
        return read_safetensors(file)

    def block_curve(self, index: int) -> list[float]:
        return self.curves[index]

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], curve: list[float]) -> None:
        from safetensors.torch import save_file

        atomic_write(self._block_file(index), lambda p: save_file(tensors, str(p)))
        self.curves[index] = curve
        report = {"loss_curves": {str(k): v for k, v in sorted(self.curves.items())}}
        write_json(self.path / "report.json", report)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for index, curve in sorted(self.curves.items()):
            ax.plot(range(1, len(curve) + 1), curve, label=f"block {index}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize="small", ncol=2)
        fig.tight_layout()
        atomic_write(self.path / "losses.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)
