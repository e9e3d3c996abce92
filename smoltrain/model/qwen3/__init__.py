"""Qwen3: Llama with per-head QK-norm (transformers' Qwen3ForCausalLM)."""

from smoltrain.model.qwen3.hf import FAMILY

__all__ = ["FAMILY"]
