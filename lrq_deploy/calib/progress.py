"""Progress reporting for calibration: one line per block, a bar over epochs while learning."""

from __future__ import annotations

import sys


class ConsoleProgress:
    def __init__(self, epochs: int, stream=sys.stderr):
        self.epochs = epochs
        self.stream = stream
        self._bar = None

    def epoch(self, epoch: int, loss: float) -> None:
        from tqdm import tqdm

        from lrq_deploy.progress import bar_size, shown

        if self._bar is None:
            self._bar = tqdm(total=self.epochs, desc="  epochs", file=self.stream, leave=False, **bar_size(),
                             disable=not (shown() and self.stream.isatty()))
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4g}")

    def block_done(self, report: dict, total: int) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(f"block {report['block'] + 1}/{total}  mse {report['mse']:.3e}  cosine {report['cosine']:.5f}"
              f"{training_line(report)}", file=self.stream, flush=True)


def training_line(report: dict) -> str:
    """What training did to the block, in the comparable quantity (fake-quant block output MSE
    to the FP output): initialisation -> kept epoch."""
    mse = report.get("mse_per_epoch")
    if not mse:
        return ""
    best = report["best_epoch"]
    kept = "initialisation kept" if best == 0 else f"epoch {best}/{len(mse) - 1} kept"
    return f"  trained mse {mse[0]:.3e} -> {mse[best]:.3e} ({kept})"
