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

        if self._bar is None:
            self._bar = tqdm(total=self.epochs, desc="  epochs", file=self.stream, leave=False, disable=None)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4g}")

    def block_done(self, report: dict, total: int) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        curve = report.get("loss_curve")
        loss = f"  loss {curve[0]:.4g} -> {curve[-1]:.4g}" if curve else ""
        print(
            f"block {report['block'] + 1}/{total}  mse {report['mse']:.3e}  cosine {report['cosine']:.5f}{loss}",
            file=self.stream, flush=True,
        )
