"""Evaluation the way the community's tools score: log-likelihood multiple choice (lighteval's
boundary and accuracies), generative exact match and pass@k, validation bits per byte, the
embedded suite, benchmark adapters, and the evaluation the trainer runs every `eval_every` steps.
"""

from smoltrain.eval.during_training import evaluate_during_training
from smoltrain.eval.run import evaluate

__all__ = ["evaluate", "evaluate_during_training"]
