"""Qwen3-MoE under tensor parallelism: attention split as the standard plan, each MoE layer's router and
experts replicated (every rank routes the gathered sequence and keeps its slice; no expert compute saved,
the simplest correct layout: MOE_SHARDING.md shards experts on F instead); dense layers split."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model import tp_plan
from smoltrain.model.family import standard_layers
from smoltrain.model.moe import MoE


def covers(m: ModelConfig) -> bool:
    return m.num_experts > 0 and standard_layers(m) and tp_plan.whole_heads_qk_norm(m)


def mlp_part(block, residual) -> dict:
    """The MoE replicated, a dense MLP (moe_dense_layers, shared-expert-free) split."""
    return tp_plan.replicated("mlp", residual) if isinstance(block.mlp, MoE) else tp_plan.mlp(residual)


def block_plan(block, config: ModelConfig, layer: int, sequence_parallel: bool) -> dict:
    residual = tp_plan.residual_layout(sequence_parallel)
    return {**tp_plan.attention(block, residual), **mlp_part(block, residual),
            **tp_plan.norms(sequence_parallel, "input_layernorm", "post_attention_layernorm")}
