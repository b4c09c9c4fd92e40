"""RTN: round-to-nearest weights, no calibration (activations per token at run time)."""

from __future__ import annotations

from lrq_deploy.calib.registry import Method, NoOptions


def quantize_block(job) -> None:
    from lrq_deploy.calib.baselines import replace_linears

    replace_linears(job)


METHOD = Method("rtn", NoOptions, quantize_block, "round to nearest, no calibration", order=0)
