"""SmoothQuant: s = max|X|^alpha / max|W|^(1 - alpha) per input channel, folded into the
preceding module, then round-to-nearest."""

from __future__ import annotations

from dataclasses import dataclass

from lrq_deploy.calib.registry import Method, check_options, option


def unit_interval(value) -> str | None:
    return None if isinstance(value, (int, float)) and 0.0 <= value <= 1.0 else "must lie in [0, 1]"


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = option(0.5, "SmoothQuant migration strength (also OmniQuant's initialisation).", unit_interval)

    def __post_init__(self):
        check_options(self)


def quantize_block(job) -> dict:
    from lrq_deploy.calib.baselines import smoothquant

    return smoothquant(job, job.options.alpha)


METHOD = Method("smoothquant", SmoothQuantOptions, quantize_block, "activation statistics, smoothing folded, RTN",
                order=1)
