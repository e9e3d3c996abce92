"""Llama: RoPE in every layer, no QK-norm, dense SwiGLU (transformers' LlamaForCausalLM)."""

from smoltrain.model.llama.hf import FAMILY

__all__ = ["FAMILY"]
