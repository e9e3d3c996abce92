"""Gemma 3's Hugging Face adapter: layer_types <-> sliding_window / global_every, the per-layer-type
rope_parameters (v5) or rope_theta / rope_local_base_freq (hub configs) <-> our two RoPE bases."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.errors import CheckpointError
from smoltrain.model.family import Family
from smoltrain.model.gemma3 import tp

# Gemma 3's fixed style: what Gemma3ForCausalLM computes whatever its config says.
STYLE = dict(qk_norm=True, qk_norm_per_head=True, norm_plus_one=True, sandwich_norm=True, embed_scale=True,
             mlp_activation="gelu_tanh")
# Without layer_types, hub configs name the pattern (a global layer every sixth by default).
DEFAULT_PATTERN = 6
# Features of other Gemma configs that Gemma3ForCausalLM computes and we do not.
UNSUPPORTED = ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention")


def computes(m: ModelConfig) -> bool:
    all_rope = all(m.uses_rope(i) for i in range(m.num_layers))
    hybrid = m.full_attention_every > 0 or m.attention_output_gate or m.partial_rotary_factor != 1.0
    return m.num_experts == 0 and all_rope and not hybrid and all(getattr(m, key) == value for key, value in STYLE.items())


def layer_types(m: ModelConfig) -> list[str]:
    return ["sliding_attention" if m.is_local_layer(i) else "full_attention" for i in range(m.num_layers)]


def to_hf(m: ModelConfig) -> dict:
    local_theta = m.rope_local_theta if m.rope_local_theta is not None else m.rope_theta
    return dict(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=m.query_pre_attn_scalar or m.resolved_head_dim,
        # transformers needs a window even when every layer is global (then no layer reads it).
        sliding_window=m.sliding_window or m.max_seq_len,
        layer_types=layer_types(m),
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": float(local_theta)},
                         "full_attention": {"rope_type": "default", "rope_theta": float(m.rope_theta)}},
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )


def _global_every(types: list[str], where: str) -> int:
    """HF's per-layer list -> our 'global every k-th layer' (0: no global layer)."""
    flags = [t == "full_attention" for t in types]
    if not any(flags):
        return 0
    for every in range(1, len(types) + 1):
        if flags == [(i + 1) % every == 0 for i in range(len(types))]:
            return every
    raise CheckpointError(f"{where}: layer_types {types} is not 'a global layer every k-th', the only pattern smoltrain models")


def _rope_bases(hf: dict, where: str) -> tuple[float, float]:
    """(global, local) RoPE bases from v5's nested rope_parameters or the hub's flat keys."""
    rope = hf.get("rope_parameters") or {}
    nested = {kind: rope.get(kind) or {} for kind in ("full_attention", "sliding_attention")}
    for kind, params in nested.items():
        if params.get("rope_type", "default") != "default":
            raise CheckpointError(f"{where}: RoPE scaling {params['rope_type']!r} on {kind} layers is not supported (only default RoPE)")
    full = nested["full_attention"].get("rope_theta") or rope.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0
    local = nested["sliding_attention"].get("rope_theta") or hf.get("rope_local_base_freq") or 10_000.0
    return float(full), float(local)


def from_hf(hf: dict, get, where: str) -> dict:
    for key in UNSUPPORTED:
        if hf.get(key):
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported by smoltrain's Gemma 3")
    num_layers = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or DEFAULT_PATTERN
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise CheckpointError(f"{where}: layer_types has {len(types)} entries for {num_layers} layers")
    every = _global_every(types, where)
    full, local = _rope_bases(hf, where)
    window = int(get("sliding_window", 4096)) if every != 1 else 0
    return dict(STYLE, sliding_window=window, global_every=every if window else 0, rope_theta=full, rope_local_theta=local,
                query_pre_attn_scalar=int(get("query_pre_attn_scalar", 256)))


FAMILY = Family(
    name="gemma3", architecture="Gemma3ForCausalLM", model_type="gemma3_text",
    defaults={"tie_word_embeddings": True, "max_position_embeddings": 131072, "head_dim": 256,
              "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6},
    summary="Gemma3ForCausalLM (sliding-window layers)", computes=computes, to_hf=to_hf, from_hf=from_hf,
    tp_covers=tp.covers, tp_plan=tp.block_plan,
)
