"""Public entry points of the bench stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lrq_deploy.atomic import write_json
from lrq_deploy.bench.harness import measure, report
from lrq_deploy.bench.runners import make_runner
from lrq_deploy.bench.stats import DEFAULT_PERCENTILES
from lrq_deploy.errors import LrqError


@dataclass(frozen=True)
class BenchOptions:
    backend: str | None = None
    batch: int = 1
    seq_len: int = 128
    warm_up_ms: float = 200.0
    iterations: int = 10
    duration_s: float = 3.0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    device: str = "auto"
    data_transfers: bool = True

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 1:
            raise LrqError("--batch and --seq-len must be >= 1")
        if self.iterations < 1 or self.duration_s < 0 or self.warm_up_ms < 0:
            raise LrqError("--iterations must be >= 1; --duration and --warm-up must be >= 0")
        if any(not 0 < p <= 100 for p in self.percentiles):
            raise LrqError("percentiles must lie in (0, 100]")


def bench(target: Path, options: BenchOptions, export_json: Path | None = None, export_times: Path | None = None) -> dict:
    runner = make_runner(Path(target), options.backend, options.batch, options.seq_len, options.device, options.data_transfers)
    timings, walltime = measure(runner, options.warm_up_ms, options.iterations, options.duration_s)
    result = {"target": str(target), **report(runner, timings, walltime, options.percentiles)}
    if export_json:
        _write_json(Path(export_json), result)
    if export_times:
        _write_json(Path(export_times), {"times": [asdict(t) for t in timings]})
    return result


def bench_compare(targets: list[Path], options: BenchOptions, export_json: Path | None = None) -> list[tuple[str, dict]]:
    """Measure several targets one after the other in one process, same settings."""
    results = [(str(t), bench(t, options)) for t in targets]
    if export_json:
        _write_json(Path(export_json), {"results": [r for _, r in results]})
    return results


def _write_json(path: Path, data: dict) -> None:
    if not path.parent.is_dir():
        raise LrqError(f"output directory {path.parent} does not exist")
    write_json(path, data)
