"""Accuracy metrics: perplexity for causal LMs, top-1 for classifiers, FP vs quantized."""

from lrq_deploy.eval.api import evaluate_checkpoint
from lrq_deploy.eval.perplexity import perplexity
from lrq_deploy.eval.top1 import top1_accuracy

__all__ = ["evaluate_checkpoint", "perplexity", "top1_accuracy"]
