"""The measurement loop, with trtexec's semantics.

Warm up for `warm_up_ms` (not recorded), then run until at least `iterations` inferences
*and* at least `duration_s` seconds are done. Throughput is inferences over total host
walltime; latency statistics are per inference.
"""

from __future__ import annotations

import time
from typing import Callable

from lrq_deploy.bench.runners import Runner
from lrq_deploy.bench.stats import DEFAULT_PERCENTILES, UNSTABLE_COV, coefficient_of_variation, summarize


def measure(
    runner: Runner, warm_up_ms: float = 200.0, iterations: int = 10, duration_s: float = 3.0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list, float]:
    """Per-inference timings and the total host walltime of the measured inferences."""
    start = clock()
    while (clock() - start) * 1e3 < warm_up_ms:
        runner.infer()
    timings = []
    begin = clock()
    while len(timings) < iterations or clock() - begin < duration_s:
        timings.append(runner.infer())
    return timings, clock() - begin


def report(runner: Runner, timings: list, walltime_s: float, percentiles=DEFAULT_PERCENTILES) -> dict:
    workload = runner.workload()
    latency = [t.latency_ms for t in timings]
    qps = len(timings) / walltime_s
    result = {
        "backend": runner.name,
        "device": runner.device,
        "workload": workload.description,
        "inferences": len(timings),
        "throughput_qps": qps,
        f"throughput_{workload.unit}_per_s": qps * workload.items_per_inference,
        "latency_ms": summarize(latency, percentiles),
        "total_host_walltime_s": walltime_s,
    }
    for key, attr in (("gpu_compute_ms", "compute_ms"), ("h2d_ms", "h2d_ms"), ("d2h_ms", "d2h_ms")):
        values = [getattr(t, attr) for t in timings if getattr(t, attr) is not None]
        if values:
            result[key] = summarize(values, percentiles)
            if key == "gpu_compute_ms":
                result["total_gpu_compute_s"] = sum(values) / 1e3
    result["warnings"] = _warnings(result, latency)
    return result


def _warnings(result: dict, latency: list[float]) -> list[str]:
    notes = []
    cov = coefficient_of_variation(latency)
    if cov > UNSTABLE_COV:
        notes.append(f"latency is unstable: coefficient of variation {cov:.1%} exceeds {UNSTABLE_COV:.1%}")
    if "h2d_ms" in result:
        transfer = result["h2d_ms"]["mean"] + result["d2h_ms"]["mean"]
        if transfer > result["gpu_compute_ms"]["mean"]:
            notes.append("throughput may be bound by host-device transfers (try --no-data-transfers)")
    if "gpu_compute_ms" in result and result["latency_ms"]["mean"] > 1.5 * result["gpu_compute_ms"]["mean"]:
        notes.append("throughput may be bound by the host (enqueue time exceeds GPU compute time)")
    return notes
