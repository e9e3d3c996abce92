"""smoltrain: plan, ablate, pretrain, evaluate and post-train small language models."""

__version__ = "0.1.0"
