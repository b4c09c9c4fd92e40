"""AWQ: activation-aware channel scales folded into the preceding module, clipping search, RTN."""

from __future__ import annotations

from dataclasses import dataclass

from lrq_deploy.calib.registry import Method, check_options, option


def grid_points(value) -> str | None:
    return None if isinstance(value, int) and 2 <= value <= 1000 else "must be an integer in [2, 1000]"


@dataclass(frozen=True)
class AWQOptions:
    grid: int = option(20, "AWQ: candidates per search (scale exponents r = k / grid; clip ratios down to 0.5).",
                       grid_points)
    clip: bool = option(True, "AWQ: search per-group weight clipping after the scales (--no-clip to skip).")

    def __post_init__(self):
        check_options(self)


def quantize_block(job) -> dict:
    from lrq_deploy.calib.awq import awq_block

    return awq_block(job, job.options.grid, job.options.clip)


def quantize_head(job):
    from lrq_deploy.calib.head import clip_search, round_to_nearest

    return clip_search(job, job.options.grid) if job.options.clip else round_to_nearest(job)


METHOD = Method("awq", AWQOptions, quantize_block, "activation-aware scales + clipping search, RTN (AWQ)", order=5,
                quantize_head=quantize_head)
