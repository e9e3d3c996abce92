"""Llama's Hugging Face adapter: only mlp_bias beyond the shared fields."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model.family import Family, standard_layers


def computes(m: ModelConfig) -> bool:
    # LlamaConfig insists on hidden_size % num_heads == 0 even with an explicit head_dim; SmolLM3
    # with RoPE in every layer is the same computation without that check.
    all_rope = all(m.uses_rope(i) for i in range(m.num_layers))
    return m.num_experts == 0 and not m.qk_norm and all_rope and m.hidden_size % m.num_heads == 0 and standard_layers(m)


FAMILY = Family(
    name="llama", architecture="LlamaForCausalLM", model_type="llama",
    defaults={"tie_word_embeddings": False, "max_position_embeddings": 2048},
    summary="LlamaForCausalLM (RoPE in every layer)",
    computes=computes, to_hf=lambda m: {"mlp_bias": False}, from_hf=lambda hf, get, where: {},
)
