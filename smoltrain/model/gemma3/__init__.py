"""Gemma 3 (text): 5 sliding-window layers to 1 global, two RoPE bases, (1 + w) sandwich norms, GeGLU,
scaled embeddings (transformers' Gemma3ForCausalLM)."""

from smoltrain.model.gemma3.hf import FAMILY

__all__ = ["FAMILY"]
