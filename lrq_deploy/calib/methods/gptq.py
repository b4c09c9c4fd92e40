"""GPTQ: Hessian-aware sequential rounding of each linear (calib/gptq.py), round-to-nearest scales."""

from __future__ import annotations

from dataclasses import dataclass

from lrq_deploy.calib.registry import Method, check_options, option


def fraction(value) -> str | None:
    return None if isinstance(value, (int, float)) and 0 < value < 1 else "must lie in (0, 1)"


def clip_rule(value) -> str | None:
    from lrq_deploy.calib.gptq import CLIPS

    return None if value in CLIPS else f"must be one of {', '.join(CLIPS)}"


def positive_int(value) -> str | None:
    return None if isinstance(value, int) and value >= 1 else "must be an integer >= 1"


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = option(0.01, "GPTQ Hessian dampening, a fraction of its mean diagonal.", fraction)
    act_order: bool = option(False, "GPTQ: round input channels by decreasing activation energy; group scales "
                                    "come from the unrounded weight (static groups), the stored layout is unchanged.")
    block_size: int = option(128, "GPTQ: columns per lazy-update block.", positive_int)
    weight_range: str = option("mse", "GPTQ: each row and group's weight range: mse (shrunk by the factor with the "
                                      "least |w - q(w)|^2.4, searched before rounding) or minmax (the full range).",
                               clip_rule)

    def __post_init__(self):
        check_options(self)


def quantize_block(job) -> dict:
    from lrq_deploy.calib.gptq import gptq_block

    options = job.options
    return gptq_block(job, options.damp, options.act_order, options.block_size, clip_rule=options.weight_range)


def quantize_head(job):
    from lrq_deploy.calib.head import gptq_rounding

    return gptq_rounding(job, job.options.damp, job.options.act_order, job.options.block_size,
                         job.options.weight_range)


METHOD = Method("gptq", GPTQOptions, quantize_block, "Hessian-aware sequential rounding (GPTQ)", order=6,
                quantize_head=quantize_head)
