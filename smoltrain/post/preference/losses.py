"""Preference losses (APO-zero, APO-down, DPO, IPO) and TRL's metrics, as pure functions of summed log-probs.

Everything here takes per-pair sums of completion-token log-probabilities (policy and reference, chosen
and rejected), as TRL 1.16's DPOTrainer does, and returns per-pair values; the caller sums them and
divides by the step's pair count. The one non-obvious decision is IPO's: TRL divides each log-ratio by
its completion's token count (the IPO authors' form), so IPO takes the token counts too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoltrain.errors import ConfigError

LOSSES = ("apo_zero", "apo_down", "dpo", "ipo")
DEFAULT_LOSS = "apo_zero"  # SmolLM3: DPO collapsed AIME25 in think mode (32.6 -> 3.1), APO-zero kept it (31.8)


def check_loss(loss: str, beta: float, where: str = "dpo") -> None:
    if loss not in LOSSES:
        raise ConfigError(f"{where}.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not beta > 0:
        raise ConfigError(f"{where}.beta must be positive, got {beta}")


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    loss: str = DEFAULT_LOSS,
    beta: float = 0.1,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss, [pairs]. r_w = policy_chosen - ref_chosen, r_l likewise (sums over completion tokens):

    apo_zero  1 - sigma(beta r_w) + sigma(beta r_l)          raise the chosen, lower the rejected
    apo_down  sigma(beta r_w) + 1 - sigma(beta (r_w - r_l))  lower both, the rejected more
    dpo       -log sigma(beta (r_w - r_l))                    TRL's loss_type="sigmoid"
    ipo       (r_w / n_w - r_l / n_l - 1 / (2 beta))^2        n: completion tokens (TRL's normalisation)
    """
    check_loss(loss, beta)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss == "apo_zero":
        return _raise_and_lower(chosen_ratio, rejected_ratio, beta)
    if loss == "apo_down":
        return _raise_and_lower(chosen_ratio - rejected_ratio, chosen_ratio, beta)
    if loss == "dpo":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if chosen_tokens is None or rejected_tokens is None:
        raise ValueError("ipo needs the completion token counts of both answers")
    delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def _raise_and_lower(raised: torch.Tensor, lowered: torch.Tensor, beta: float) -> torch.Tensor:
    """The APO shape, 1 - sigma(beta raised) + sigma(beta lowered): APO-zero raises r_w and lowers r_l,
    APO-down raises the margin r_w - r_l and lowers r_w."""
    return 1 - torch.sigmoid(beta * raised) + torch.sigmoid(beta * lowered)


def sft_losses(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's supervised term per pair: the chosen answer's negative log-likelihood per token.

    (TRL's loss_type "sft" takes one token mean over the whole batch instead; the two agree when the
    chosen answers of a batch have equal lengths.)"""
    return -policy_chosen / chosen_tokens.clamp(min=1)


def pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    loss: str = DEFAULT_LOSS,
    beta: float = 0.1,
    sft_weight: float = 0.0,
) -> torch.Tensor:
    """The objective's per-pair loss: the preference loss plus sft_weight x the RPO term."""
    total = preference_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, chosen_tokens, rejected_tokens)
    if sft_weight:
        total = total + sft_weight * sft_losses(policy_chosen, chosen_tokens)
    return total


def reward_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, tuple[torch.Tensor, int]]:
    """TRL's logged quantities as (sum over pairs, pair count), so ranks and micro-batches add up:
    rewards/chosen = beta x (policy - reference) of the chosen answer, rewards/rejected likewise,
    rewards/accuracies = share of pairs whose chosen reward is strictly higher, rewards/margins,
    logps/chosen and logps/rejected (the policy's summed log-probs)."""
    with torch.no_grad():
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
            _at_least_float32(t.detach()) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        )
        chosen_reward = beta * (policy_chosen - ref_chosen)
        rejected_reward = beta * (policy_rejected - ref_rejected)
        n = int(policy_chosen.numel())
        return {
            "rewards/chosen": (chosen_reward.sum(), n),
            "rewards/rejected": (rejected_reward.sum(), n),
            "rewards/accuracies": ((chosen_reward > rejected_reward).float().sum(), n),
            "rewards/margins": ((chosen_reward - rejected_reward).sum(), n),
            "logps/chosen": (policy_chosen.sum(), n),
            "logps/rejected": (policy_rejected.sum(), n),
        }


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


__all__ = ["LOSSES", "DEFAULT_LOSS", "check_loss", "preference_losses", "sft_losses", "pair_losses", "reward_metrics"]
