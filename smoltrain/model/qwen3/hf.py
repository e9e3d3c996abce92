"""Qwen3's Hugging Face adapter: QK-norm on, sliding window off."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model.family import Family, standard_layers


def computes(m: ModelConfig) -> bool:
    all_rope = all(m.uses_rope(i) for i in range(m.num_layers))
    return m.num_experts == 0 and m.qk_norm and m.qk_norm_per_head and all_rope and standard_layers(m)


FAMILY = Family(
    name="qwen3", architecture="Qwen3ForCausalLM", model_type="qwen3",
    defaults={"tie_word_embeddings": False, "max_position_embeddings": 32768, "head_dim": 128},
    summary="Qwen3ForCausalLM (QK-norm)", computes=computes,
    to_hf=lambda m: {"use_sliding_window": False, "max_window_layers": m.num_layers},
    from_hf=lambda hf, get, where: {"qk_norm": True},
)
