"""SmolLM3's Hugging Face adapter: the per-layer no_rope_layers list <-> our nope_every."""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.errors import CheckpointError
from smoltrain.model.family import Family, standard_layers


def computes(m: ModelConfig) -> bool:
    return m.num_experts == 0 and not m.qk_norm and standard_layers(m)


def to_hf(m: ModelConfig) -> dict:
    return dict(
        mlp_bias=False,
        no_rope_layers=[int(m.uses_rope(i)) for i in range(m.num_layers)],
        no_rope_layer_interval=m.nope_every if m.nope_every > 0 else 4,
        use_sliding_window=False,
    )


def nope_pattern(no_rope_layers: list[int], num_layers: int, where: str) -> dict:
    """SmolLM3's per-layer list (1 = RoPE) -> our position_encoding / nope_every."""
    flags = [int(bool(x)) for x in no_rope_layers[:num_layers]]
    if len(flags) < num_layers:
        raise CheckpointError(f"{where}: no_rope_layers has {len(flags)} entries for {num_layers} layers")
    if all(flags):
        return {"nope_every": 0}
    if not any(flags):
        return {"position_encoding": "none"}
    for every in range(2, num_layers + 1):
        if flags == [int((i + 1) % every != 0) for i in range(num_layers)]:
            return {"nope_every": every}
    raise CheckpointError(
        f"{where}: no_rope_layers {flags} is not 'no RoPE in every k-th layer', the only NoPE pattern smoltrain models"
    )


def from_hf(hf: dict, get, where: str) -> dict:
    num_layers = hf["num_hidden_layers"]
    interval = get("no_rope_layer_interval", 4)
    pattern = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    return nope_pattern(pattern, num_layers, where)


FAMILY = Family(
    name="smollm3", architecture="SmolLM3ForCausalLM", model_type="smollm3",
    defaults={"tie_word_embeddings": True, "max_position_embeddings": 32768},
    summary="SmolLM3ForCausalLM (NoPE layers)", computes=computes, to_hf=to_hf, from_hf=from_hf,
)
