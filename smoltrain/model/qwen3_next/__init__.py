"""Qwen3-Next: gated DeltaNet linear attention (model/qwen3_next/delta_rule.py, layer.py) with gated full
attention every k-th layer (transformers' Qwen3NextForCausalLM, dense MLPs)."""

from smoltrain.model.qwen3_next.hf import FAMILY

__all__ = ["FAMILY"]
