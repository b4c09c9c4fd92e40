"""Accuracy metrics shared by the model adapters and the stages: perplexity, top-1, agreement with FP."""

from lrq_deploy.metrics.agreement import output_agreement
from lrq_deploy.metrics.perplexity import perplexity, perplexity_from_logits, windows
from lrq_deploy.metrics.top1 import top1_accuracy, top1_from_logits

__all__ = ["output_agreement", "perplexity", "perplexity_from_logits", "top1_accuracy", "top1_from_logits", "windows"]
