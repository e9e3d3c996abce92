"""Qwen3-Next's Hugging Face adapter: layer_types <-> full_attention_every, the linear layers' shapes,
partial RoPE; dense MLPs only (its MoE gates the shared expert, which our MoE does not)."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.errors import CheckpointError
from smoltrain.model.family import Family
from smoltrain.model.qwen3_next import tp

# Qwen3-Next's fixed style: (1 + w) norms, per-head QK-norm, gated attention output.
STYLE = dict(qk_norm=True, qk_norm_per_head=True, norm_plus_one=True, attention_output_gate=True)
LINEAR_KEYS = {"linear_num_key_heads": "linear_num_key_heads", "linear_num_value_heads": "linear_num_value_heads",
               "linear_key_head_dim": "linear_key_head_dim", "linear_value_head_dim": "linear_value_head_dim",
               "linear_conv_kernel": "linear_conv_kernel_dim"}


def computes(m: ModelConfig) -> bool:
    all_rope = all(m.uses_rope(i) for i in range(m.num_layers))
    style = all(getattr(m, key) == value for key, value in STYLE.items())
    plain = m.sliding_window == 0 and not m.sandwich_norm and not m.embed_scale and m.mlp_activation == "silu"
    return m.num_experts == 0 and m.full_attention_every > 0 and all_rope and style and plain


def to_hf(m: ModelConfig) -> dict:
    types = ["linear_attention" if m.is_linear_layer(i) else "full_attention" for i in range(m.num_layers)]
    return dict(
        layer_types=types,
        num_experts=0,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta), "partial_rotary_factor": m.partial_rotary_factor},
        **{hf: getattr(m, ours) for ours, hf in LINEAR_KEYS.items()},
    )


def from_hf(hf: dict, get, where: str) -> dict:
    if hf.get("num_experts") and len(hf.get("mlp_only_layers") or []) < hf["num_hidden_layers"]:
        raise CheckpointError(f"{where}: Qwen3-Next's mixture of experts (a sigmoid-gated shared expert) is not supported; "
                              "dense Qwen3-Next configs only (num_experts: 0)")
    num_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["linear_attention" if (i + 1) % get("full_attention_interval", 4) else "full_attention"
                                      for i in range(num_layers)]
    full = [t == "full_attention" for t in types]
    every = next((k for k in range(1, num_layers + 1) if full == [(i + 1) % k == 0 for i in range(num_layers)]), None)
    if every is None:
        raise CheckpointError(f"{where}: layer_types {types} is not 'full attention every k-th layer', the only pattern smoltrain models")
    rope = hf.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 0.25
    fields = {ours: int(get(hf_key)) for ours, hf_key in LINEAR_KEYS.items()}
    return dict(STYLE, full_attention_every=every, partial_rotary_factor=float(factor), **fields)


FAMILY = Family(
    name="qwen3_next", architecture="Qwen3NextForCausalLM", model_type="qwen3_next",
    defaults={"tie_word_embeddings": False, "max_position_embeddings": 32768, "head_dim": 256,
              "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
              "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4},
    summary="Qwen3NextForCausalLM (gated DeltaNet hybrid, dense)", computes=computes, to_hf=to_hf, from_hf=from_hf,
    tp_covers=tp.covers, tp_plan=tp.block_plan,
)
