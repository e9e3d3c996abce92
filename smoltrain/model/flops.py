"""Counting: parameters, training FLOPs per token, KV-cache bytes and training memory, from the
config alone (no model is built), so the planner can size a 3B run on a laptop.

FLOPs per token follow the playbook: 6 x matmul parameters (the output head included, tied or not,
because its matmul runs either way) + 6 x layers x attention width x sequence (causal attention).
A mixture of experts counts its active parameters for FLOPs (router, top-k experts, shared expert)
and its total ones for memory (torchtitan's get_moe_model_nparams_and_flops).
"""

from __future__ import annotations

from smoltrain.config import ModelConfig
from smoltrain.model.loss import LOSS_CHUNK_ELEMENTS


def _mlp_parameters(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(stored, active per token) matmul parameters of one layer's MLP: an MoE layer stores its router
    and every expert but runs the router, its top-k experts and the shared expert for a token."""
    hidden = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return 3 * hidden * cfg.intermediate_size, 3 * hidden * cfg.intermediate_size  # gate, up, down
    router = hidden * cfg.num_experts
    expert = 3 * hidden * cfg.resolved_expert_hidden
    shared = 3 * hidden * cfg.shared_expert_hidden
    return router + cfg.num_experts * expert + shared, router + cfg.experts_per_token * expert + shared


def _attention_parameters(cfg: ModelConfig) -> int:
    queries = cfg.num_heads * (2 if cfg.attention_output_gate else 1)  # the output gate doubles q_proj
    return cfg.hidden_size * cfg.resolved_head_dim * (queries + cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o + k, v


def _linear_attention_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul, other) parameters of a gated DeltaNet layer: projections; convolution, decay, norm."""
    keys, values = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    matmul = cfg.hidden_size * (2 * keys + 2 * values + 2 * cfg.linear_num_value_heads) + values * cfg.hidden_size
    other = (2 * keys + values) * cfg.linear_conv_kernel + 2 * cfg.linear_num_value_heads + cfg.linear_value_head_dim
    return matmul, other


def _mixer_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul, other) parameters of every layer's token mixer together: attention or linear attention."""
    linear = sum(cfg.is_linear_layer(i) for i in range(cfg.num_layers))
    linear_matmul, linear_other = _linear_attention_parameters(cfg)
    return (cfg.num_layers - linear) * _attention_parameters(cfg) + linear * linear_matmul, linear * linear_other


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """total (as stored: a tied head counts once), embedding, non_embedding, matmul (the matmul
    parameters a token runs through: every one in a dense model, the routed top-k experts in an MoE)
    and active (total less the experts a token skips; equal to total in a dense model)."""
    embedding = cfg.vocab_size * cfg.hidden_size
    untied_head = 0 if cfg.tie_embeddings else embedding
    if cfg.qk_norm:
        qk_norms = 2 * cfg.resolved_head_dim if cfg.qk_norm_per_head else (cfg.num_heads + cfg.num_kv_heads) * cfg.resolved_head_dim
    else:
        qk_norms = 0
    attention_layers = sum(not cfg.is_linear_layer(i) for i in range(cfg.num_layers))
    mlp = [_mlp_parameters(cfg, i) for i in range(cfg.num_layers)]
    attention, mixer_other = _mixer_parameters(cfg)
    norms = cfg.num_layers * (4 if cfg.sandwich_norm else 2) * cfg.hidden_size + attention_layers * qk_norms
    layers = attention + mixer_other + sum(stored for stored, _ in mlp) + norms
    total = embedding + untied_head + layers + cfg.hidden_size  # + final norm
    skipped = sum(stored - active for stored, active in mlp)
    return {
        "total": total,
        "embedding": embedding + untied_head,
        "non_embedding": total - embedding - untied_head,
        "matmul": attention + sum(active for _, active in mlp) + embedding,  # + the head's matmul
        "active": total - skipped,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at a sequence length, from the active parameters."""
    attention_width = cfg.num_heads * cfg.resolved_head_dim
    # Softmax attention layers only (a sliding-window layer counted at full length: an upper bound);
    # linear layers' state work is O(1) per token and left out, as their matmuls dominate.
    attention_layers = sum(not cfg.is_linear_layer(i) for i in range(cfg.num_layers))
    return 6.0 * parameter_counts(cfg)["matmul"] + 6.0 * attention_layers * attention_width * seq_len


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for one token: what GQA saves at inference."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * bytes_per_value


def _mean_mlp_width(cfg: ModelConfig) -> int:
    """SwiGLU width a token's activations span per layer: the dense width, or k experts + the shared one."""
    moe = cfg.experts_per_token * cfg.resolved_expert_hidden + cfg.shared_expert_hidden
    widths = [moe if cfg.is_moe_layer(i) else cfg.intermediate_size for i in range(cfg.num_layers)]
    return sum(widths) // cfg.num_layers


def training_memory_bytes(
    cfg: ModelConfig,
    micro_batch_size: int,
    seq_len: int,
    activation_checkpointing: bool = False,
    num_shards: int = 1,
    checkpoint_every: int = 1,
    loss_parallel: bool = False,
    tensor_parallel: int = 1,
    master_bytes: int = 4,
    activation_bytes: int = 2,
) -> dict[str, int]:
    """Estimated peak bytes per device for AdamW training with fp32 master weights.

    Weights, gradients and the two AdamW moments are divided by `num_shards` (FSDP). Activations are
    per device and assume a flash/flex attention kernel (no seq x seq scores stored). Per layer and
    token a block keeps about 6 x hidden + 2 x kv width + 4 x SwiGLU width values (norm inputs and
    outputs, q/k/v, attention output, gate/up/activation/product); with activation checkpointing a
    recomputed block (every `checkpoint_every`-th) keeps only its input, and one block's activations
    exist again during its recompute. Tensor parallelism with sequence parallel splits the blocks'
    activations over `tensor_parallel` ranks (its share of the weights is already in `num_shards`),
    and the logits too with `loss_parallel`; without it every TP rank holds the full logits.
    """
    params = parameter_counts(cfg)["total"]
    tokens = micro_batch_size * seq_len
    kv_width = cfg.num_kv_heads * cfg.resolved_head_dim
    per_layer_token = 6 * cfg.hidden_size + 2 * kv_width + 4 * _mean_mlp_width(cfg)
    recomputed = len(range(0, cfg.num_layers, checkpoint_every)) if activation_checkpointing else 0
    saved = recomputed * cfg.hidden_size + (cfg.num_layers - recomputed) * per_layer_token
    if recomputed:
        saved += per_layer_token
    activations = (tokens * saved * activation_bytes + 2 * tokens * cfg.hidden_size * activation_bytes) // tensor_parallel
    # Loss: one chunk of float32 logits and its gradient (the embedding output and final norm above).
    logits = 2 * min(tokens * cfg.vocab_size, LOSS_CHUNK_ELEMENTS) * 4
    activations += logits // tensor_parallel if loss_parallel else logits
    weights = params * master_bytes // num_shards
    gradients = params * master_bytes // num_shards
    optimizer = 2 * params * 4 // num_shards
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "total": weights + gradients + optimizer + activations,
    }
