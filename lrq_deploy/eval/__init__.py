"""The eval stage: a quantized checkpoint next to the full-precision model it came from."""

from lrq_deploy.eval.api import EvalOptions, evaluate_checkpoint
from lrq_deploy.metrics import perplexity, top1_accuracy

__all__ = ["EvalOptions", "evaluate_checkpoint", "perplexity", "top1_accuracy"]
