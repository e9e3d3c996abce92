"""Qwen3-MoE: Qwen3 attention with mixture-of-experts MLPs, dense where mlp_only_layers / decoder_sparse_step
say (transformers' Qwen3MoeForCausalLM)."""

from smoltrain.model.qwen3_moe.hf import FAMILY

__all__ = ["FAMILY"]
