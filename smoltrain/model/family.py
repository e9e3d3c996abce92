"""What a model family is: the transformers class that computes exactly what our model computes for
some configs, its Hugging Face adapter both ways (config fields and weight names), and its
tensor-parallel plan (model/tp_plan.py's standard one unless the family's folder has its own tp.py).

Each family lives in its own folder (smoltrain/model/<family>/) and is one line of model/families.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from smoltrain.config import ModelConfig
from smoltrain.errors import CheckpointError
from smoltrain.model import tp_plan


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the transformers class, e.g. Qwen3MoeForCausalLM
    model_type: str  # config.json's model_type
    defaults: dict  # config.json defaults that differ between families (read when a key is absent)
    summary: str  # for "supported: ..." messages
    computes: Callable[[ModelConfig], bool]  # does the HF class compute exactly this config?
    to_hf: Callable[[ModelConfig], dict]  # config.json fields beyond the shared ones
    from_hf: Callable[[dict, Callable, str], dict]  # ModelConfig fields beyond the shared ones
    # Tensor parallelism: the configs whose every block the plan splits correctly, and the plan of one
    # block, (block, config, layer index, sequence_parallel) -> {submodule name: ParallelStyle}.
    tp_covers: Callable[[ModelConfig], bool] = field(default=lambda m: standard_tp_covers(m))  # defined below
    tp_plan: Callable = tp_plan.standard_block


# ----------------------------------------------------------------------------- MoE weight names
# Ours stack the experts ([E, F, D], torchtitan); Hugging Face's files keep one Linear per expert
# (`mlp.experts.{j}.gate_proj.weight`), the on-disk form transformers 4.x and 5.x both load.

_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def unstack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors -> one HF Linear weight per expert; the loss-free bias has no HF
    counterpart (export refuses models that use it, so it is all zeros here) and is left out."""
    out = {}
    for name, tensor in state.items():
        match = _STACKED.match(name)
        if match:
            for j, part in enumerate(tensor.unbind(0)):
                out[f"{match[1]}.{j}.{match[2]}.weight"] = part.contiguous()
        elif not name.endswith(".mlp.expert_bias"):
            out[name] = tensor
    return out


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF per-expert Linear weights -> our stacked tensors (experts in index order), plus a zero bias."""
    out, parts = {}, {}
    for name, tensor in state.items():
        match = _PER_EXPERT.match(name)
        if match:
            parts.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
        else:
            out[name] = tensor
    for (prefix, proj), experts in parts.items():
        if sorted(experts) != list(range(len(experts))):
            raise CheckpointError(f"{prefix}: expert indices {sorted(experts)} are not 0..{len(experts) - 1}")
        out[f"{prefix}.{proj}"] = torch.stack([experts[j] for j in range(len(experts))])
        gate = prefix.removesuffix(".experts") + ".gate.weight"
        if proj == "gate_proj" and gate in state:
            out[prefix.removesuffix(".experts") + ".expert_bias"] = torch.zeros(len(experts), dtype=torch.float32)
    return out


# Router options some MoE configs carry that our dropless, noise-free router does not compute.
UNSUPPORTED_MOE_KEYS = ("router_jitter_noise", "capacity_factor", "expert_capacity", "moe_capacity_factor", "clip_qkv",
                        "shared_expert_intermediate_size")


def refuse_unsupported_moe_keys(hf: dict, where: str) -> None:
    for key in UNSUPPORTED_MOE_KEYS:
        if hf.get(key):
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported (smoltrain's router is dropless, without noise)")


def moe_fields(hf: dict, get: Callable, where: str) -> dict:
    """Router fields both MoE families share (num_experts: hub name; num_local_experts: 5.x to_dict)."""
    refuse_unsupported_moe_keys(hf, where)
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not isinstance(experts, int) or experts <= 0:
        raise CheckpointError(f"{where}: missing or non-positive num_experts")
    return dict(
        num_experts=experts,
        experts_per_token=int(get("num_experts_per_tok")),
        norm_topk_prob=bool(get("norm_topk_prob", False)),
        aux_loss_coef=float(get("router_aux_loss_coef")),
    )


def moe_hf_fields(m: ModelConfig) -> dict:
    return dict(
        num_experts=m.num_experts,
        num_experts_per_tok=m.experts_per_token,
        norm_topk_prob=m.norm_topk_prob,
        router_aux_loss_coef=m.aux_loss_coef,
        # transformers adds coef x aux to its loss only with this on: training parity needs it.
        output_router_logits=m.aux_loss_coef > 0,
    )


def plain_moe(m: ModelConfig) -> bool:
    """Routing both HF MoE families compute: no shared expert, no loss-free bias, RoPE in every layer."""
    all_rope = all(m.uses_rope(i) for i in range(m.num_layers))
    return m.num_experts > 0 and m.shared_expert_hidden == 0 and m.bias_update_rate == 0 and all_rope and standard_layers(m)


def standard_layers(m: ModelConfig) -> bool:
    """Llama's layer style, the one every family but Gemma and Qwen3-Next computes: global softmax attention
    in every layer, full RoPE, no output gate, w-scaled norms before attention and MLP only, SwiGLU,
    unscaled embeddings, head_dim ** -0.5 attention scale."""
    return (m.sliding_window == 0 and m.rope_local_theta is None and not m.norm_plus_one and not m.sandwich_norm
            and not m.embed_scale and m.mlp_activation == "silu" and m.query_pre_attn_scalar in (None, m.resolved_head_dim)
            and m.full_attention_every == 0 and not m.attention_output_gate and m.partial_rotary_factor == 1.0)


def standard_tp_covers(m: ModelConfig) -> bool:
    """Dense, Llama's layer style (Llama, SmolLM3 with NoPE layers, Qwen3 with per-head QK-norm)."""
    return m.num_experts == 0 and standard_layers(m) and tp_plan.whole_heads_qk_norm(m)


__all__ = ["Family", "stack_experts", "unstack_experts", "moe_fields", "moe_hf_fields", "plain_moe", "refuse_unsupported_moe_keys",
           "standard_layers", "standard_tp_covers"]
