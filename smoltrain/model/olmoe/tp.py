"""OLMoE under tensor parallelism: its QK-norm spans all heads, which a column-wise q/k split would cut
into 1/tp of the width, so attention is replicated like the MoE layers (Qwen3-MoE's plan for those)."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model import tp_plan
from smoltrain.model.family import standard_layers
from smoltrain.model.qwen3_moe.tp import mlp_part


def covers(m: ModelConfig) -> bool:
    return m.num_experts > 0 and standard_layers(m) and not tp_plan.whole_heads_qk_norm(m)


def block_plan(block, config: ModelConfig, layer: int, sequence_parallel: bool) -> dict:
    residual = tp_plan.residual_layout(sequence_parallel)
    return {**tp_plan.replicated("self_attn", residual, other_args=4), **mlp_part(block, residual),  # (x, cos, sin, mask, cache)
            **tp_plan.norms(sequence_parallel, "input_layernorm", "post_attention_layernorm")}
