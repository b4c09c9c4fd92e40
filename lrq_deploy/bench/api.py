"""Public entry points of the bench stage."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from lrq_deploy.atomic import check_output_file, write_json
from lrq_deploy.bench.decode import DecodeOptions, make_decoder, measure_decode
from lrq_deploy.bench.harness import measure, report
from lrq_deploy.bench.runners import make_runner
from lrq_deploy.bench.stats import DEFAULT_PERCENTILES, check_options
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
        check_options((("--batch", self.batch, 1), ("--seq-len", self.seq_len, 1), ("--iterations", self.iterations, 1),
                       ("--duration", self.duration_s, 0), ("--warm-up", self.warm_up_ms, 0)), self.percentiles)


def bench(target: Path, options: BenchOptions, export_json: Path | None = None, export_times: Path | None = None) -> dict:
    """Per-inference latency and throughput of one target (trtexec semantics)."""
    for path, option in ((export_json, "--export-json"), (export_times, "--export-times")):
        if path is not None:
            check_output_file(Path(path), True, inputs=[Path(target)], option=option)
    runner = make_runner(Path(target), options.backend, options.batch, options.seq_len, options.device, options.data_transfers)
    with runtime_errors(runner.name, target, f"batch {options.batch}, seq-len {options.seq_len}"):
        timings, walltime = measure(runner, options.warm_up_ms, options.iterations, options.duration_s)
    result = {"target": str(target), **report(runner, timings, walltime, options.percentiles)}
    if export_json:
        write_json(Path(export_json), result)
    if export_times:
        write_json(Path(export_times), {"times": [asdict(t) for t in timings]})
    return result


def bench_decode(target: Path, options: DecodeOptions, export_json: Path | None = None) -> dict:
    """Generation speed of one target: time to first token, per-token latency, tokens/s."""
    if export_json is not None:
        check_output_file(Path(export_json), True, inputs=[Path(target)], option="--export-json")
    decoder = make_decoder(Path(target), options.device)
    with runtime_errors(decoder.name, target, f"batch {options.batch}, prompt {options.prompt_len}"):
        result = {"target": str(target), **measure_decode(decoder, options)}
    if export_json:
        write_json(Path(export_json), result)
    return result


def bench_compare(targets: list[Path], options: BenchOptions | DecodeOptions,
                  export_json: Path | None = None) -> list[tuple[str, dict]]:
    """Measure several targets one after the other in one process, same settings
    (per inference with BenchOptions, generation with DecodeOptions)."""
    if export_json is not None:
        check_output_file(Path(export_json), True, inputs=targets, option="--export-json")
    one = bench_decode if isinstance(options, DecodeOptions) else bench
    results = [(str(t), one(t, options)) for t in targets]
    if export_json:
        write_json(Path(export_json), {"results": [r for _, r in results]})
    return results


@contextmanager
def runtime_errors(backend: str, target: Path, shape: str):
    """onnxruntime (its own exception types), TensorRT and torch failures at run time as one line."""
    try:
        yield
    except LrqError:
        raise
    except Exception as exc:
        detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise LrqError(f"{backend} failed to run {target} at {shape}: {detail[:200]}") from None
