"""The trainer's mixture-of-experts step: expert loads pooled over the step's micro-batches and the
data-parallel ranks (global-batch statistics), DeepSeek-V3's loss-free bias update, router metrics.

Runs before the optimizer step (torchtitan's pre-hook), so gradient accumulation counts every micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smoltrain.model.moe import take_counts, update_expert_bias


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "module", model)  # DDP
    return getattr(base, "_orig_mod", base)  # whole-model compile


def moe_layers(model: nn.Module) -> list:
    base = _base(model)
    return base.moe_layers() if hasattr(base, "moe_layers") else []


def router_step(model: nn.Module, ctx, bias_update_rate: float) -> dict:
    """Router metrics of this step (empty for a dense model); updates the loss-free bias when on.

    moe_max_load / moe_min_load: the busiest / idlest expert's tokens over the mean, worst layer (1 is
    balance; E / k: every token went to the same experts; 0: a dead expert); moe_load: [layer][expert]
    shares of the step's tokens (the report's heat map); aux, z-loss and entropy of the last micro-batch."""
    layers = moe_layers(model)
    counts = take_counts(layers) if layers else None
    if counts is None:
        return {}
    counts = ctx.all_reduce_dp(counts.float(), op="sum")
    if bias_update_rate > 0:
        update_expert_bias(layers, counts, bias_update_rate)
    metrics = _base(model).router_metrics()
    relative = counts / counts.mean(dim=-1, keepdim=True).clamp_min(1e-9)
    metrics.update(
        moe_max_load=float(relative.max()),
        moe_min_load=float(relative.min()),
        moe_load=(counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)).tolist(),
    )
    if bias_update_rate > 0:
        metrics["moe_bias_abs"] = float(torch.stack([layer.expert_bias.abs().max() for layer in layers]).max())
    return metrics


__all__ = ["router_step", "moe_layers"]
