"""Human-readable output of `lrq bench`, modelled on trtexec's performance summary."""

from __future__ import annotations


def _line(name: str, stats: dict) -> str:
    parts = [f"min = {stats['min']:.5g} ms", f"max = {stats['max']:.5g} ms", f"mean = {stats['mean']:.5g} ms",
             f"median = {stats['median']:.5g} ms"]
    parts += [f"percentile({p}%) = {v:.5g} ms" for p, v in stats["percentiles"].items()]
    return f"{name}: " + ", ".join(parts)


def threads_note(result: dict) -> str:
    threads = result.get("threads")
    return f"; {threads} threads" if isinstance(threads, int) else ""


def summary(result: dict) -> str:
    unit_key = next(k for k in result if k.startswith("throughput_") and k.endswith("_per_s"))
    unit = unit_key[len("throughput_"):-len("_per_s")]
    lines = [
        f"=== Performance summary ({result['backend']} on {result['device']}: {result['workload']}{threads_note(result)}) ===",
        f"Throughput: {result['throughput_qps']:.5g} qps ({result[unit_key]:.5g} {unit}/s)",
        _line("Latency", result["latency_ms"]),
    ]
    for key, name in (("h2d_ms", "H2D Latency"), ("gpu_compute_ms", "GPU Compute Time"), ("d2h_ms", "D2H Latency")):
        if key in result:
            lines.append(_line(name, result[key]))
    lines.append(f"Total Host Walltime: {result['total_host_walltime_s']:.5g} s ({result['inferences']} inferences)")
    if "total_gpu_compute_s" in result:
        lines.append(f"Total GPU Compute Time: {result['total_gpu_compute_s']:.5g} s")
    lines += [f"* {w}" for w in result["warnings"]]
    return "\n".join(lines)


def comparison(results: list[tuple[str, dict]]) -> str:
    """One table of several targets; ratios against the first."""
    base = results[0][1]
    header = f"{'target':<40}{'backend':>8}{'mean ms':>12}{'median ms':>12}{'qps':>12}{'speedup':>9}"
    lines = [header, "-" * len(header)]
    for name, result in results:
        speedup = base["latency_ms"]["mean"] / result["latency_ms"]["mean"]
        lines.append(
            f"{name[-40:]:<40}{result['backend']:>8}{result['latency_ms']['mean']:>12.4g}"
            f"{result['latency_ms']['median']:>12.4g}{result['throughput_qps']:>12.4g}{ratio(speedup):>9}"
        )
    return "\n".join(lines)


def ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a 1000x slower row is 0.001x, not 0.00x)."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"
