"""Hugging Face interop of the model layer: config.json <-> ModelConfig and weight names, per family.

Our parameter names are Hugging Face's minus the `model.` prefix (MoE experts stacked), so conversion
is a rename; the one decision is the architecture, which each family in model/families.py answers
(Llama, SmolLM3, Qwen3, Qwen3-MoE, OLMoE, Gemma 3, Qwen3-Next). Loading and saving folders is train/load_model.py's.
"""

from __future__ import annotations

import torch

from smoltrain.config import ModelConfig, RopeScaling, validate_model
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model.families import FAMILIES
from smoltrain.model.family import Family, stack_experts, standard_layers, unstack_experts

# Hugging Face class -> (model_type, config defaults that differ between the families).
SUPPORTED = {f.architecture: (f.model_type, f.defaults) for f in FAMILIES}
_SUPPORTED_TEXT = ", ".join(f.summary for f in FAMILIES)
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
# transformers' activation name -> ours (the gated MLP's).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------- config mapping


def family_of(m: ModelConfig) -> Family:
    """The family whose transformers class computes exactly what our model computes."""
    all_rope = all(m.uses_rope(i) for i in range(m.num_layers))
    if m.qk_norm and not all_rope:
        raise CheckpointError(
            "no Hugging Face architecture has QK-norm together with NoPE layers "
            f"(model.qk_norm with model.nope_every/position_encoding); supported: {_SUPPORTED_TEXT}"
        )
    for family in FAMILIES:
        if family.computes(m):
            return family
    if not standard_layers(m):
        raise CheckpointError("no Hugging Face architecture computes this mixture of Gemma's or Qwen3-Next's layer style "
                              f"(sliding windows, sandwich norms, linear or gated attention) with others; supported: {_SUPPORTED_TEXT}")
    raise CheckpointError(
        "no Hugging Face architecture computes this mixture of experts (it needs QK-norm, RoPE in every layer, "
        f"no shared expert and no loss-free bias: model.shared_expert_hidden=0, model.bias_update_rate=0); supported: {_SUPPORTED_TEXT}"
    )


def hf_architecture(m: ModelConfig) -> str:
    """The transformers class that computes exactly what our model computes."""
    return family_of(m).architecture


def to_hf_config(m: ModelConfig, special_ids: dict[str, int] | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents for the architecture `hf_architecture(m)` picks."""
    family = family_of(m)
    # Token ids must lie inside the vocabulary (SmolLM3Config's defaults do not for small vocabularies).
    special = {k: v for k, v in (special_ids or {}).items() if v is not None and 0 <= v < m.vocab_size}
    kwargs = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.resolved_head_dim,
        hidden_act={ours: name for name, ours in ACTIVATIONS.items()}[m.mlp_activation],
        max_position_embeddings=m.max_seq_len,
        initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        rope_parameters=to_rope_parameters(m),
        attention_bias=False,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
        dtype=str(dtype).removeprefix("torch."),
    )
    kwargs.update(family.to_hf(m))

    from transformers import AutoConfig

    hf = AutoConfig.for_model(family.model_type, **kwargs)
    hf.architectures = [family.architecture]
    return hf.to_dict()



_YARN_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def to_rope_parameters(m: ModelConfig) -> dict:
    """transformers' v5 `rope_parameters`: the base, and the scaling's own keys under HF's names."""
    r = m.rope_scaling
    if r is None or r.rope_type == "default":
        return {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    params = {"rope_type": r.rope_type, "rope_theta": float(m.rope_theta), "factor": float(r.factor)}
    if r.rope_type == "yarn":
        params["original_max_position_embeddings"] = r.original_max_seq_len
        params.update({key: getattr(r, key) for key in _YARN_KEYS if getattr(r, key) is not None})
    return params


def from_rope_parameters(rope: dict, hf: dict, where: str) -> RopeScaling | None:
    """Our RopeScaling from `rope_parameters` / legacy `rope_scaling` (legacy `type` read as `rope_type`);
    the other scalings (llama3, longrope, dynamic) are refused with their name."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type not in ("linear", "yarn"):
        raise CheckpointError(f"{where}: RoPE scaling {rope_type!r} is not supported (default, linear and yarn are)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
    if rope.get("factor") is None:
        raise CheckpointError(f"{where}: RoPE scaling {rope_type!r} without a factor")
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(rope["factor"]))
    # transformers' standardize_rope_params: a top-level original length wins, else the scaling's, else max_position_embeddings.
    original = (hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
    extra = {key: rope[key] for key in _YARN_KEYS if rope.get(key) is not None}
    return RopeScaling(rope_type="yarn", factor=float(rope["factor"]), original_max_seq_len=int(original), **extra)


def from_hf_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json mapping; unsupported features name their key."""
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture is None:  # some configs only carry model_type
        by_type = {model_type: name for name, (model_type, _) in SUPPORTED.items()}
        architecture = by_type.get(hf.get("model_type"))
    if architecture not in SUPPORTED:
        found = architecture or hf.get("model_type") or "no architecture"
        raise CheckpointError(f"{where}: unsupported architecture {found}; supported: {_SUPPORTED_TEXT}")
    family = _BY_ARCHITECTURE[architecture]
    defaults = family.defaults

    def get(key, default=None):
        value = hf.get(key)
        return defaults.get(key, default) if value is None else value

    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported by smoltrain's model")
    activation = hf.get("hidden_activation") or get("hidden_act", "silu")  # Gemma names it hidden_activation
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act={activation!r} is not supported (smoltrain's gated MLP: {', '.join(ACTIVATIONS)})")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # legacy key, then v5's
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise CheckpointError(f"{where}: missing or non-integer {key}")

    num_layers, num_heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
    head_dim = get("head_dim")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=get("num_key_value_heads", num_heads),
        # Stored only when it differs from the derived value, so Llama shapes keep head_dim: null.
        head_dim=None if head_dim in (None, hidden // num_heads) and hidden % num_heads == 0 else head_dim,
        intermediate_size=hf["intermediate_size"],
        tie_embeddings=bool(get("tie_word_embeddings")),
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0),
        rope_scaling=from_rope_parameters(rope, hf, where),
        init_std=float(get("initializer_range", 0.02)),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        max_seq_len=int(get("max_position_embeddings")),
        mlp_activation=ACTIVATIONS[activation],
    )
    fields.update(family.from_hf(hf, get, where))
    model_config = ModelConfig(**fields)
    try:
        validate_model(model_config)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return model_config


# ----------------------------------------------------------------------------- weight names


def to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face's names (`model.` prefix; MoE experts one Linear each)."""
    state = unstack_experts(state)
    return {name if name.startswith("lm_head.") else f"model.{name}": t for name, t in state.items()}


def from_hf_names(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; we recompute it
            continue
        if name == "lm_head.weight" and tied:
            continue
        state[name.removeprefix("model.")] = tensor
    return stack_experts(state)


__all__ = ["SUPPORTED", "family_of", "hf_architecture", "to_hf_config", "from_hf_config", "to_hf_names", "from_hf_names"]
