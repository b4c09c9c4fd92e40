"""trtexec-style statistics over per-inference timings (milliseconds)."""

from __future__ import annotations

import math
import statistics

DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)
UNSTABLE_COV = 0.025  # trtexec warns above 2.5% coefficient of variation


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the timings at or below it."""
    if not sorted_ms:
        raise ValueError("no timings")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ms)))
    return sorted_ms[min(rank, len(sorted_ms)) - 1]


def summarize(timings_ms: list[float], percentiles=DEFAULT_PERCENTILES) -> dict:
    """min / max / mean / median / percentiles of one kind of timing."""
    ordered = sorted(timings_ms)
    return {
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "percentiles": {f"{p:g}": percentile(ordered, p) for p in percentiles},
    }


def coefficient_of_variation(timings_ms: list[float]) -> float:
    if len(timings_ms) < 2:
        return 0.0
    mean = statistics.fmean(timings_ms)
    return statistics.pstdev(timings_ms) / mean if mean else 0.0


def check_options(minimums: tuple, percentiles: tuple[float, ...], context: str = "") -> None:
    """One clear line for the first (option, value, least) below its least, or a percentile outside (0, 100]."""
    from lrq_deploy.errors import LrqError

    for option, value, least in minimums:
        if value < least:
            raise LrqError(f"{option} must be >= {least}{context}, got {value:g}")
    bad = [p for p in percentiles if not 0 < p <= 100]
    if bad:
        raise LrqError(f"--percentile values must lie in (0, 100], got {bad[0]:g}")
