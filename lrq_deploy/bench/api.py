"""Public entry points of the bench stage."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from lrq_deploy.atomic import (
    OutputKind, check_distinct_outputs, claim_output, is_json_of, output_scope, write_json,
)
from lrq_deploy.bench.decode import DecodeOptions, make_decoder, measure_decode
from lrq_deploy.bench.harness import measure, report
from lrq_deploy.bench.runners import make_runner
from lrq_deploy.bench.stats import DEFAULT_PERCENTILES, check_options
from lrq_deploy.runtime.threads import threads_in_use, use_threads
from lrq_deploy.errors import LrqError


RECORD_FORMAT = "lrq-bench/1"
OUTPUT = OutputKind("benchmark record", directory=False, recognise=lambda p: is_json_of(p, "format", RECORD_FORMAT))


def claim_records(records: dict, targets: list, force: bool) -> None:
    """--export-json / --export-times files, claimed before anything is measured."""
    check_distinct_outputs(records)
    for option, path in records.items():
        if path is not None:
            claim_output(Path(path), OUTPUT, force, inputs=targets, option=option)


def write_record(path: Path, data: dict) -> None:
    write_json(Path(path), {"format": RECORD_FORMAT, **data})


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
    threads: int | None = None  # intra-op threads of onnxruntime / torch (None: their defaults)

    def __post_init__(self):
        check_options((("--batch", self.batch, 1), ("--seq-len", self.seq_len, 1), ("--iterations", self.iterations, 1),
                       ("--duration", self.duration_s, 0), ("--warm-up", self.warm_up_ms, 0)), self.percentiles)


@output_scope()
def bench(target: Path, options: BenchOptions, export_json: Path | None = None, export_times: Path | None = None,
          force: bool = False) -> dict:
    """Per-inference latency and throughput of one target (trtexec semantics)."""
    claim_records({"--export-json": export_json, "--export-times": export_times}, [target], force)
    use_threads(options.threads)
    runner = make_runner(Path(target), options.backend, options.batch, options.seq_len, options.device, options.data_transfers)
    with runtime_errors(runner.name, target, f"batch {options.batch}, seq-len {options.seq_len}"):
        timings, walltime = measure(runner, options.warm_up_ms, options.iterations, options.duration_s)
    result = {"target": str(target), **report(runner, timings, walltime, options.percentiles), **threads_in_use()}
    if export_json:
        write_record(export_json, result)
    if export_times:
        write_record(export_times, {"times": [asdict(t) for t in timings]})
    return result


@output_scope()
def bench_decode(target: Path, options: DecodeOptions, export_json: Path | None = None, force: bool = False) -> dict:
    """Generation speed of one target: time to first token, per-token latency, tokens/s."""
    claim_records({"--export-json": export_json}, [target], force)
    use_threads(options.threads)
    decoder = make_decoder(Path(target), options.device)
    with runtime_errors(decoder.name, target, f"batch {options.batch}, prompt {options.prompt_len}"):
        result = {"target": str(target), **measure_decode(decoder, options), **threads_in_use()}
    if export_json:
        write_record(export_json, result)
    return result


@output_scope()
def bench_compare(targets: list[Path], options: BenchOptions | DecodeOptions,
                  export_json: Path | None = None, force: bool = False) -> list[tuple[str, dict]]:
    """Measure several targets one after the other in one process, same settings
    (per inference with BenchOptions, generation with DecodeOptions)."""
    claim_records({"--export-json": export_json}, targets, force)
    one = bench_decode if isinstance(options, DecodeOptions) else bench
    results = [(str(t), one(t, options)) for t in targets]
    if export_json:
        write_record(export_json, {"results": [r for _, r in results]})
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
