"""What the learnable block-wise methods (OmniQuant, LRQuant, LRQuant+) share: their options and
the training loop of calib/learnable.py, which each runs with its own recipe."""

from __future__ import annotations

from dataclasses import dataclass

from lrq_deploy.calib.registry import check_options, option, positive_finite


ROUNDINGS = ("nearest", "gptq")


def _rounding(value) -> str | None:
    return None if value in ROUNDINGS else f"must be one of {', '.join(ROUNDINGS)}"


def _non_negative(value) -> str | None:
    return None if isinstance(value, int) and value >= 0 else "must be an integer >= 0"


@dataclass(frozen=True)
class LearnableOptions:
    epochs: int = option(10, "Epochs per block.", _non_negative)
    lr_smooth: float = option(5e-3, "Learning rate of smoothing scales, shifts and rotation gains.", positive_finite)
    lr_lwc: float = option(1e-2, "Learning rate of the learnable weight clipping.", positive_finite)
    compile: bool = option(False, "torch.compile each block's training step (faster epochs; results equal "
                                  "within float tolerance, not bit for bit).")
    learn_transforms: bool = option(False, "With --rotate: learn the online transforms too, each Kronecker factor "
                                           "times a learned invertible matrix (identity at the start), the linear's "
                                           "weight taking its inverse; trained with the block's loss, folded into "
                                           "the transform's factors.")
    rounding: str = option("nearest", "How the trained block's weights are rounded: nearest, or gptq (GPTQ rounding "
                                      "under the learned clipping, after the learned transforms are folded).", _rounding)
    holdout: int = option(4, "With --rounding gptq: calibration windows drawn besides --nsamples and never trained "
                             "on, on which each block's rounding is chosen (0: chosen on the training windows).",
                          _non_negative)

    def __post_init__(self):
        check_options(self)

    @property
    def held_out_samples(self) -> int:
        """Windows the calibration engine draws to choose among roundings (learnable.ROUNDINGS)."""
        return self.holdout if self.rounding == "gptq" else 0


def learn_with(recipe):
    """quantize_block for a learnable method: train the block's parameters (or read them back
    from the run directory), fold them, quantize."""

    def quantize_block(job):
        from lrq_deploy.calib.learnable import learn_block

        return learn_block(job, recipe)

    quantize_block.recipe = recipe  # for tools that drive the training loop themselves (benchmarks/calib_speed.py)
    return quantize_block


def quantize_head(job):
    """The head rounded as the blocks were: GPTQ under --rounding gptq, else to nearest (nothing is
    learned for the head)."""
    from lrq_deploy.calib.head import gptq_rounding, round_to_nearest

    return gptq_rounding(job) if job.options.rounding == "gptq" else round_to_nearest(job)
