"""Qwen3-MoE's Hugging Face adapter: moe_intermediate_size is the expert width, intermediate_size the
dense layers'; mlp_only_layers and decoder_sparse_step are our moe_dense_layers and moe_every."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model.family import Family, moe_fields, moe_hf_fields, plain_moe
from smoltrain.model.qwen3_moe import tp


def computes(m: ModelConfig) -> bool:
    return plain_moe(m) and m.qk_norm and m.qk_norm_per_head


def to_hf(m: ModelConfig) -> dict:
    return dict(
        **moe_hf_fields(m),
        moe_intermediate_size=m.resolved_expert_hidden,
        decoder_sparse_step=m.moe_every,
        mlp_only_layers=list(m.moe_dense_layers),
        use_sliding_window=False,
        max_window_layers=m.num_layers,
    )


def from_hf(hf: dict, get, where: str) -> dict:
    return dict(
        **moe_fields(hf, get, where),
        qk_norm=True,
        expert_hidden=int(get("moe_intermediate_size")),
        moe_every=int(get("decoder_sparse_step", 1)),
        moe_dense_layers=[int(i) for i in get("mlp_only_layers", [])],
    )


FAMILY = Family(
    name="qwen3_moe", architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe",
    defaults={"tie_word_embeddings": False, "max_position_embeddings": 32768, "head_dim": 128, "num_experts_per_tok": 8,
              "moe_intermediate_size": 768, "router_aux_loss_coef": 0.001},
    summary="Qwen3MoeForCausalLM (MoE + per-head QK-norm)", computes=computes, to_hf=to_hf, from_hf=from_hf,
    tp_covers=tp.covers, tp_plan=tp.block_plan,
)
