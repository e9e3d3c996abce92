"""OLMoE's Hugging Face adapter: intermediate_size is the expert width, every layer is sparse, the
head width is hidden_size / num_heads (no head_dim key), clip_qkv is refused."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model.family import Family, moe_fields, moe_hf_fields, plain_moe
from smoltrain.model.olmoe import tp


def computes(m: ModelConfig) -> bool:
    every_layer = all(m.is_moe_layer(i) for i in range(m.num_layers))
    return (plain_moe(m) and m.qk_norm and not m.qk_norm_per_head and every_layer
            and m.resolved_head_dim * m.num_heads == m.hidden_size)


def to_hf(m: ModelConfig) -> dict:
    return dict(**moe_hf_fields(m), intermediate_size=m.resolved_expert_hidden, clip_qkv=None)


def from_hf(hf: dict, get, where: str) -> dict:
    return dict(**moe_fields(hf, get, where), qk_norm=True, qk_norm_per_head=False, expert_hidden=hf["intermediate_size"])


FAMILY = Family(
    name="olmoe", architecture="OlmoeForCausalLM", model_type="olmoe",
    defaults={"tie_word_embeddings": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "num_experts_per_tok": 8,
              "router_aux_loss_coef": 0.01},
    summary="OlmoeForCausalLM (MoE + full-width QK-norm)", computes=computes, to_hf=to_hf, from_hf=from_hf,
    tp_covers=tp.covers, tp_plan=tp.block_plan,
)
