"""Pretraining as an objective (train/objective.py): the packed token stream of data/, and the
model's summed cross-entropy (+ z-loss) over every position.

The loss is a sum and the count its label tokens, so the Trainer divides by the label tokens of the
whole step; packed sequences label every position, so this equals the old per-micro-batch mean.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from smoltrain.config import Config, grad_accumulation
from smoltrain.data.stages import stage_seq_lens


def next_token_loss(model: nn.Module, batch: dict):
    """Summed cross-entropy (+ z-loss) of the labelled positions of packed, document-masked rows,
    their count, and cross-entropy alone as the logged "loss" (SFT's loss too: its labels mask
    everything but the assistant's tokens). A context-parallel rank's part (train/context_parallel.py
    split_batch) brings its positions and cross-rank attention mask instead of document_ids."""
    out = model(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"], reduction="sum",
                position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask"))
    return out.loss, out.num_tokens, {"loss": (out.ce_loss, out.num_tokens)}


def describe_token_step(config: Config, seq_len: int, dp_world: int) -> str:
    """A token-batched objective's step (pretraining, SFT) for the Trainer's start line."""
    micro, accumulation = config.train.micro_batch_size, grad_accumulation(config.train, seq_len, dp_world)
    return (f"{micro} x {seq_len} tokens x {accumulation} accumulation x {dp_world} data-parallel = "
            f"{micro * seq_len * accumulation * dp_world:,} tokens")


class PretrainObjective:
    """Next-token prediction on the training loader's packed sequences (intra-document masking by
    document_ids); "loss" is reported as cross-entropy alone, z-loss is only backpropagated."""

    name = "pretrain"

    def __init__(self, config: Config, batches):
        self.config = config
        self.batches = batches

    def loss(self, model: nn.Module, batch: dict):
        return next_token_loss(model, batch)

    def accumulation(self, seq_len: int, dp_world: int) -> int:
        return grad_accumulation(self.config.train, seq_len, dp_world)

    def describe_step(self, seq_len: int, dp_world: int) -> str:
        return describe_token_step(self.config, seq_len, dp_world)

    def stateful(self) -> dict:
        return {}  # the loader's position is saved as `batches`; nothing else draws or moves

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, model: nn.Module) -> dict:
        return {}  # validation and eval.tasks run for every objective (Trainer.evaluate)


def check_pretrain_batches(config: Config, ctx) -> None:
    """Every stage's batch splits over this data-parallel degree: checked before the model is built."""
    for seq_len in stage_seq_lens(config.data):
        grad_accumulation(config.train, seq_len, ctx.dp_world)


def build_pretrain_objective(config: Config, model: nn.Module, ctx, run_dir: Path) -> PretrainObjective:
    """The training loader for this data-parallel rank."""
    from smoltrain.data.loader import build_train_loader

    return PretrainObjective(config, build_train_loader(config, ctx.dp_rank, ctx.dp_world))


build_pretrain_objective.preflight = check_pretrain_batches  # Trainer: checks that run before the model exists
build_pretrain_objective.splits_sequences = True  # packed rows of seq_len: parallel.cp may split them


__all__ = ["PretrainObjective", "build_pretrain_objective", "check_pretrain_batches", "next_token_loss"]
