"""Qwen3-Next under tensor parallelism: the gated full-attention layers split as the standard plan (each
head's [query | gate] rows stay on one rank), the gated DeltaNet layers replicated. Splitting those by key
head would need the conv1d's [q | k | v] channels sharded piecewise; at 3 of 4 layers that is the next step."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model import tp_plan


def covers(m: ModelConfig) -> bool:
    return (m.num_experts == 0 and m.full_attention_every > 0 and m.sliding_window == 0 and not m.sandwich_norm
            and tp_plan.whole_heads_qk_norm(m))


def block_plan(block, config: ModelConfig, layer: int, sequence_parallel: bool) -> dict:
    residual = tp_plan.residual_layout(sequence_parallel)
    if config.is_linear_layer(layer):  # GatedDeltaNet.forward(x, segments, cache)
        mixer = tp_plan.replicated("linear_attn", residual, other_args=2)
    else:
        mixer = tp_plan.attention(block, residual)
    return {**mixer, **tp_plan.mlp(residual), **tp_plan.norms(sequence_parallel, "input_layernorm", "post_attention_layernorm")}
