"""GRPO rollouts: G sampled completions per prompt through the KV-cache sampler, and the training
micro-batches built from them (prompt + completion, right-padded, labels on the completion only).

Completions keep their first end-of-turn token and are trained on it (TRL). Under torchrun each rank
samples its own prompts' groups, in lockstep with the others (model.generate.sample's `lockstep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoltrain.model.generate import sample


@dataclass
class Rollouts:
    """One rank's completions of a step, grouped: rows g*G .. g*G + G - 1 answer prompt g."""

    prompt_ids: list[list[int]]  # per completion (each prompt repeated G times)
    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # at sampling time, from logits / temperature
    entropies: list[list[float]]
    truncated: list[bool]  # no end token within max_completion_length
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def max_over_ranks(group=None, device: torch.device | str = "cpu"):
    """The `lockstep` function for sample(): the max of an int over the data-parallel group."""
    import torch.distributed as dist

    def agree(value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())

    return agree


def generate_rollouts(model: torch.nn.Module, prompts: list[list[int]], num_generations: int, max_completion_length: int,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      stop_tokens=(), generator: torch.Generator | None = None, lockstep=None) -> Rollouts:
    """Sample `num_generations` completions of every prompt in one batch (the prompt's rows adjacent)."""
    import time

    repeated = [p for p in prompts for _ in range(num_generations)]
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        samples = sample(model, prompts, max_completion_length, temperature, top_k, top_p, stop_tokens, generator,
                         lockstep=lockstep, repeats=num_generations)
    finally:
        model.train(was_training)
    return Rollouts(repeated, samples.tokens, samples.logprobs, samples.entropies,
                    [not done for done in samples.finished], time.perf_counter() - start)


def micro_batches(rollouts: Rollouts, advantages: torch.Tensor, size: int, mask_truncated: bool = False,
                  pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Training micro-batches of `size` completions: input_ids = prompt + completion right-padded (so
    plain causal attention and positions from 0 see each row exactly as sampled), labels the next
    token on completion positions only, loss_mask the labels' positions that enter the loss (0 on
    truncated completions under DAPO's overlong filtering), advantages per row, sampling log-probs."""
    batches = []
    for start in range(0, len(rollouts), size):
        rows = range(start, min(start + size, len(rollouts)))
        width = max(len(rollouts.prompt_ids[i]) + len(rollouts.completion_ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        sampled = torch.zeros(len(rows), width)
        for r, i in enumerate(rows):
            prompt, completion = rollouts.prompt_ids[i], rollouts.completion_ids[i]
            n, m = len(prompt), len(completion)
            input_ids[r, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
            # position t predicts token t + 1: the completion's tokens are predicted from n - 1 on
            labels[r, n - 1 : n + m - 1] = torch.tensor(completion, dtype=torch.long)
            sampled[r, n - 1 : n + m - 1] = torch.tensor(rollouts.logprobs[i])
        truncated = torch.tensor([rollouts.truncated[i] for i in rows])
        loss_mask = (labels != -100) & ~(truncated[:, None] & mask_truncated)
        batches.append({"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                        "advantages": advantages[list(rows)].float(), "sampling_logprobs": sampled})
    return batches


__all__ = ["Rollouts", "generate_rollouts", "max_over_ranks", "micro_batches"]
