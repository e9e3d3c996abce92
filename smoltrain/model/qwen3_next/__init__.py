"""Qwen3-Next: gated DeltaNet linear attention (model/linear_attention.py over model/delta_rule.py) with
gated full attention every k-th layer (transformers' Qwen3NextForCausalLM, dense MLPs)."""

from smoltrain.model.qwen3_next.hf import FAMILY

__all__ = ["FAMILY"]
