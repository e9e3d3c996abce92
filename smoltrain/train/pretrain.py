"""Pretraining as an objective (train/objective.py): the packed token stream of data/, and the
model's summed cross-entropy (+ z-loss) over every position.

The loss is a sum and the count its label tokens, so the Trainer divides by the label tokens of the
whole step; packed sequences label every position, so this equals the old per-micro-batch mean.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from smoltrain.config import Config
from smoltrain.errors import ConfigError


def stage_seq_lens(config: Config) -> list[int]:
    """The sequence length of the data section and of every stage after it (a stage inherits it)."""
    seq_lens, current = [config.data.seq_len], config.data.seq_len
    for stage in config.data.stages:
        current = stage.seq_len or current
        seq_lens.append(current)
    return seq_lens


def grad_accumulation(config: Config, seq_len: int, dp_world: int) -> int:
    """Micro-batches per optimizer step on each rank: global_batch_tokens = micro x seq x this x dp."""
    per_step = config.train.micro_batch_size * seq_len * dp_world
    if config.train.global_batch_tokens % per_step:
        raise ConfigError(
            f"train.global_batch_tokens ({config.train.global_batch_tokens}) must be a multiple of "
            f"train.micro_batch_size x seq_len x data-parallel ranks "
            f"({config.train.micro_batch_size} x {seq_len} x {dp_world} = {per_step})"
        )
    return config.train.global_batch_tokens // per_step


class PretrainObjective:
    """Next-token prediction on the training loader's packed sequences (intra-document masking by
    document_ids); "loss" is reported as cross-entropy alone, z-loss is only backpropagated."""

    name = "pretrain"

    def __init__(self, config: Config, batches):
        self.config = config
        self.batches = batches

    def loss(self, model: nn.Module, batch: dict):
        out = model(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"], reduction="sum")
        return out.loss, out.num_tokens, {"loss": (out.ce_loss, out.num_tokens)}

    def accumulation(self, seq_len: int, dp_world: int) -> int:
        return grad_accumulation(self.config, seq_len, dp_world)

    def stateful(self) -> dict:
        return {}  # the loader's position is saved as `batches`; nothing else draws or moves

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, model: nn.Module) -> dict:
        return {}  # validation and eval.tasks run for every objective (Trainer.evaluate)


def build_pretrain_objective(config: Config, model: nn.Module, ctx, run_dir: Path) -> PretrainObjective:
    """The training loader for this data-parallel rank; every stage's batch split is checked now,
    not when the stage starts hours later."""
    from smoltrain.data.loader import build_train_loader

    objective = PretrainObjective(config, build_train_loader(config, ctx.dp_rank, ctx.dp_world))
    for seq_len in stage_seq_lens(config):
        objective.accumulation(seq_len, ctx.dp_world)
    return objective


__all__ = ["PretrainObjective", "build_pretrain_objective", "grad_accumulation", "stage_seq_lens"]
