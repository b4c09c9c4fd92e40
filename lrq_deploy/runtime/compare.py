"""One comparison of two runners' outputs, for export verification, engine verification and
tests: Polygraphy's Comparator with SimpleCompareFunc (max / mean / median absolute and
relative error, pass/fail against atol + rtol), plus what a quantized model's user also asks:
cosine similarity and argmax (top-1 token or class) agreement. Iterations (batches) are
aggregated: maxima over all, means weighted by element count, cosine over everything."""

from __future__ import annotations

import numpy as np


def compare_runs(reference: tuple[str, list[dict]], candidate: tuple[str, list[dict]],
                 atol: float = 1e-5, rtol: float = 1e-5) -> dict[str, dict]:
    """reference / candidate: (runner name, per-iteration {output name: array}); returns per
    output: max_abs_error, mean_abs_error, median_abs_error, max_rel_error, mean_rel_error,
    cosine, argmax_agreement, passed (Polygraphy's verdict at atol / rtol), iterations."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # verdicts are returned, not logged
    runs = RunResults()
    for name, iterations in (reference, candidate):
        runs.append((name, [IterationResult({k: np.asarray(v) for k, v in it.items()}, runner_name=name)
                            for it in iterations]))
    accuracy = Comparator.compare_accuracy(runs, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True))
    per_iteration = accuracy[0][(reference[0], candidate[0])]
    return {name: _summary(name, per_iteration, reference[1], candidate[1]) for name in per_iteration[0]}


def _summary(name: str, per_iteration: list, reference: list[dict], candidate: list[dict]) -> dict:
    results = [it[name] for it in per_iteration]
    sizes = [np.asarray(ref[name]).size for ref in reference]
    total = sum(sizes)
    dot = ref_sq = cand_sq = largest = 0.0
    agree = count = 0
    for ref, cand in zip(reference, candidate):
        a, b = np.asarray(ref[name], np.float64), np.asarray(cand[name], np.float64)
        largest = max(largest, float(np.abs(a).max(initial=0.0)))
        dot, ref_sq, cand_sq = dot + float((a * b).sum()), ref_sq + float((a * a).sum()), cand_sq + float((b * b).sum())
        if a.ndim:
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += a.argmax(-1).size
    return {
        "max_abs_error": float(max(r.max_absdiff for r in results)),
        "mean_abs_error": float(sum(r.mean_absdiff * n for r, n in zip(results, sizes)) / total),
        "median_abs_error": float(np.median([r.median_absdiff for r in results])),
        "max_rel_error": float(max(r.max_reldiff for r in results)),  # elementwise: huge near zero outputs
        "reference_max_abs": largest,  # the scale max_abs_error is read against
        "mean_rel_error": float(sum(r.mean_reldiff * n for r, n in zip(results, sizes)) / total),
        "cosine": dot / max(np.sqrt(ref_sq * cand_sq), 1e-30),
        "argmax_agreement": agree / count if count else 1.0,
        "passed": all(bool(r) for r in results),
        "iterations": len(results),
    }


def run_iterations(runner, feeds: list[dict]) -> list[dict]:
    """Each feed through an activated Polygraphy runner; outputs as numpy arrays."""
    with runner:
        return [{k: np.asarray(v) for k, v in runner.infer(feed, check_inputs=False).items()} for feed in feeds]
