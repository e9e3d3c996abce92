"""Tensor-parallel plans of the decoder's parts, the one home of what every family shares: Megatron's
column-/row-wise attention and SwiGLU, a replicated part, sequence-parallel norms, embedding and head.

A family's plan (model/<family>/tp.py, or `standard_block` here) says how each block is split; the
trainer applies it from outside (train/parallelize.py), as torchtitan's models declare and its trainer
parallelises. Local head counts fall out of the sharding: the model views with -1.
"""

from __future__ import annotations

from smoltrain.config import ModelConfig


def residual_layout(sequence_parallel: bool):
    """The residual stream's layout between blocks: a slice of the sequence under sequence parallel."""
    from torch.distributed.tensor import Replicate, Shard

    return Shard(1) if sequence_parallel else Replicate()


def outer_plan(untied_head: bool, sequence_parallel: bool, loss_parallel: bool) -> dict:
    """Embedding, head and final norm. An untied embedding and head are split row-wise and column-wise as
    in torchtitan. A tied one is replicated over TP unless `loss_parallel`: then it is split by vocabulary,
    for the embedding and the head alike, and the logits stay vocabulary-sharded into the loss (each rank
    computes 1/tp of the head, the largest matmul of a small model, and holds 1/tp of the float32 logits).
    Under sequence parallel the final norm gathers the sequence back: the chunked loss needs it whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel

    residual = residual_layout(sequence_parallel)
    plan = {}
    if untied_head or loss_parallel:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if untied_head:
        plan["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                          use_local_output=not loss_parallel)
    elif sequence_parallel and not loss_parallel:
        plan["embed_tokens"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True)
    if sequence_parallel:
        plan["norm"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
    return plan


def attention(block, residual, name: str = "self_attn") -> dict:
    """q/k/v column-wise (whole heads per rank; with Qwen3-Next's output gate each head's [query | gate]
    rows stay together), o row-wise: one all-reduce (or reduce-scatter) per attention. A per-head QK-norm
    sees the local heads (dim 2 of [batch, seq, heads, head_dim]): as torchtitan's Qwen3 plan, its weight
    becomes a replicated DTensor, so its gradient sums over every rank's heads (a plain tensor's would
    hold this rank's heads only and the ranks' weights would drift apart from the first step)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    plan = {  # Attention.forward(x, cos, sin, mask, cache): only x is distributed
        name: PrepareModuleInput(input_layouts=(residual, None, None, None, None),
                                 desired_input_layouts=(Replicate(), None, None, None, None)),
        f"{name}.q_proj": ColwiseParallel(),
        f"{name}.k_proj": ColwiseParallel(),
        f"{name}.v_proj": ColwiseParallel(),
        f"{name}.o_proj": RowwiseParallel(output_layouts=residual),
    }
    if getattr(block, name).q_norm is not None:
        plan[f"{name}.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan[f"{name}.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def mlp(residual) -> dict:
    """gate/up column-wise, down row-wise (SwiGLU or Gemma's GeGLU: same names)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    return {
        "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=residual),
    }


def replicated(name: str, residual, other_args: int = 0) -> dict:
    """A part every TP rank computes whole on the gathered sequence, keeping its slice of the output:
    no compute saved, nothing communicated beyond the residual stream's gather. Its first argument is
    the residual stream; `other_args` more pass through untouched."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    rest = (None,) * other_args
    return {name: PrepareModuleInputOutput(
        input_layouts=(residual, *rest), desired_input_layouts=(Replicate(), *rest), use_local_input=True,
        output_layouts=(Replicate(),), desired_output_layouts=(residual,), use_local_output=True,
    )}


def norms(sequence_parallel: bool, *names: str, local_output: bool = False) -> dict:
    """Norms on the residual stream work on their slice of the sequence under sequence parallel. A norm
    feeding a split part hands it a DTensor; one whose output is added to the residual stream (Gemma's
    post-norms) a plain tensor, as the stream is."""
    from torch.distributed.tensor.parallel import SequenceParallel

    return {name: SequenceParallel(use_local_output=local_output) for name in names} if sequence_parallel else {}


def whole_heads_qk_norm(m: ModelConfig) -> bool:
    """QK-norm per head (or none): it runs on the local heads; a full-width one (OLMoE) would see 1/tp of the width."""
    return not m.qk_norm or m.qk_norm_per_head


def standard_block(block, config: ModelConfig, layer: int, sequence_parallel: bool) -> dict:
    """Attention and MLP split Megatron-style, the two pre-norms sequence-parallel."""
    residual = residual_layout(sequence_parallel)
    return {**attention(block, residual), **mlp(residual), **norms(sequence_parallel, "input_layernorm", "post_attention_layernorm")}


__all__ = ["attention", "mlp", "norms", "outer_plan", "replicated", "residual_layout", "standard_block", "whole_heads_qk_norm"]
