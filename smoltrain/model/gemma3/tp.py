"""Gemma 3 under tensor parallelism: attention (local and global alike: the window is in the mask) and the
GeGLU split as the standard plan; its sandwich norms, two more on the residual stream, sequence-parallel."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model import tp_plan


def covers(m: ModelConfig) -> bool:
    return (m.num_experts == 0 and m.full_attention_every == 0 and not m.attention_output_gate
            and m.partial_rotary_factor == 1.0 and tp_plan.whole_heads_qk_norm(m))


def block_plan(block, config: ModelConfig, layer: int, sequence_parallel: bool) -> dict:
    if not config.sandwich_norm:
        return tp_plan.standard_block(block, config, layer, sequence_parallel)
    # x + post_attention_layernorm(attn(input_layernorm(x))), then the same with pre/post_feedforward around the MLP
    residual = tp_plan.residual_layout(sequence_parallel)
    return {**tp_plan.attention(block, residual), **tp_plan.mlp(residual),
            **tp_plan.norms(sequence_parallel, "input_layernorm", "pre_feedforward_layernorm"),
            **tp_plan.norms(sequence_parallel, "post_attention_layernorm", "post_feedforward_layernorm", local_output=True)}
