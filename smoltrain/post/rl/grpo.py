"""GRPO's arithmetic: group advantages, the clipped per-token objective, the k3 KL term, and the three
loss aggregations, as pure functions on tensors (TRL 1.16's conventions, checked by hand in tests).

The aggregation returns a (sum, count) pair rather than a mean, so the one Trainer loop can divide by
the count of the whole step, all-reduced over ranks: `dapo` counts completion tokens (TRL's
`num_items_in_batch`), `grpo` and `dr_grpo` count sequences (a mean of per-sequence means, and a sum
over the constant `max_completion_length` per sequence).
"""

from __future__ import annotations

from typing import Literal

import torch

ADVANTAGE_EPS = 1e-4  # TRL: (r - mean) / (std + 1e-4); a group of equal rewards gets advantage 0
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: Literal["group", "batch", "none"] = "group",
                     scorable: torch.Tensor | None = None) -> torch.Tensor:
    """[groups x group_size] rewards (each group consecutive) -> advantages r - group mean, divided by
    the group's (or, with "batch", the whole batch's) Bessel-corrected std + 1e-4 unless "none".

    Unscorable completions (`scorable` False: every reward function returned None) take no part in
    their group's mean and std and get advantage 0."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    rewards = rewards.double()
    if scorable is None:
        scorable = torch.ones_like(rewards, dtype=torch.bool)
    values = torch.where(scorable, rewards, torch.nan).view(-1, group_size)
    mean = values.nanmean(dim=1, keepdim=True)
    advantages = values - mean
    if scale_rewards == "group":
        std = _nanstd(values, dim=1, keepdim=True)
        advantages = advantages / (std + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        std = _nanstd(values.reshape(-1), dim=0, keepdim=True)
        advantages = advantages / (std + ADVANTAGE_EPS)
    # NaN where unscorable, or where a whole group is unscorable (mean of nothing) -> 0
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0).float()


def _nanstd(values: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN (torch has nanmean but no nanstd); 0 with fewer than 2 values."""
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    centred = values - values.nanmean(dim=dim, keepdim=True)
    variance = centred.pow(2).nansum(dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    std = variance.sqrt()
    return std if keepdim else std.squeeze(dim)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def per_token_loss(logprobs: torch.Tensor, advantages: torch.Tensor, old_logprobs: torch.Tensor | None = None,
                   epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                   ref_logprobs: torch.Tensor | None = None, kl_bias_correction: bool = True) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
    (+ beta * k3 KL, multiplied by the ratio when `kl_bias_correction`, TRL's default).

    logprobs [batch, seq] (with grad), advantages [batch]; old_logprobs None means on-policy (a single
    iteration over the rollouts): the ratio is exp(logp - logp.detach()) == 1, whose gradient is the
    plain policy gradient. Returns the per-token loss and the tensors the metrics need."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    a = advantages[:, None]
    loss = -torch.min(ratio * a, clipped * a)
    parts = {
        "ratio": ratio.detach(),
        # TRL's clip_ratio: the tokens whose gradient the clip removed (the min chose the clipped side)
        "low_clipped": (ratio < 1 - epsilon) & (a < 0),
        "high_clipped": (ratio > 1 + epsilon_high) & (a > 0),
    }
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logprobs, ref_logprobs)
        parts["kl"] = kl.detach()
        loss = loss + beta * (kl * ratio if kl_bias_correction else kl)
    return loss, parts


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of a micro-batch's [batch, seq] per-token loss over its completion `mask`; the loop
    divides the step's summed sums by its summed counts (over micro-batches and ranks):
    dapo -> sum over tokens / tokens (token-level over the global batch), grpo -> sum of per-sequence
    token means / sequences, dr_grpo -> sum over tokens / (sequences x max_completion_length)."""
    mask = mask.to(loss.dtype)
    if loss_type == "dapo":
        return (loss * mask).sum(), mask.sum()
    sequences = torch.tensor(float(loss.shape[0]), device=loss.device)
    if loss_type == "grpo":
        per_sequence = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum(), sequences
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        return (loss * mask).sum() / max_completion_length, sequences
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def soft_overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO's soft overlong punishment in tokens: 0 up to max_len - cache, then linear down to -1 at
    max_len, -1 beyond."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return (max_len - cache - length) / cache
    return -1.0


__all__ = [
    "ADVANTAGE_EPS",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "aggregate",
    "group_advantages",
    "k3_kl",
    "per_token_loss",
    "soft_overlong_penalty",
]
