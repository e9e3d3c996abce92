"""What the one training loop needs from an objective: batches, and a loss that returns sums.

Pretraining, SFT, preference training and GRPO are each an `Objective`; the `Trainer` in
train/trainer.py knows none of them. The loss returns a *sum* and the count it should be divided
by, so the loop can normalise by the count of the whole step, all-reduced over data-parallel ranks
(torchtitan's "global valid tokens"): a masked objective is then not biased by how its label tokens
fall into micro-batches and ranks.

The contract, in words (the Protocols below say the same in types):

- `objective.batches` has the data loader's interface: `next_batch()` -> a dict of CPU tensors,
  which always holds "input_ids" and "labels" ([batch, seq], -100 where no loss is taken; the loop
  counts label tokens for tokens/s and MFU from it), plus whatever the loss needs;
  `state_dict()` / `load_state_dict()` (exact resume: JSON-serialisable and identical on every
  rank, a position in global units the loader re-splits for another data-parallel degree),
  `skip(n)` (the spike guard's rewind), `set_stage(i)` and `seq_len` / `stage` (curricula of
  `data.stages`; a post-training source with one stage keeps stage -1), `close()`.
- `objective.loss(model, batch)` -> `(loss_sum, count, metrics)`: `loss_sum` a scalar tensor the
  loop backpropagates as is; after the last micro-batch it divides the gradients by the step's
  `count` summed over micro-batches and data-parallel ranks (label tokens for token-level losses,
  pairs for DPO, sequences for per-sequence GRPO aggregation), so the result is exactly the
  gradient of (sum of all loss sums) / (sum of all counts). `metrics` maps a name to a
  `(sum, count)` pair, reported as global sum / global count (TRL's names: "rewards/chosen", ...);
  a metric named "loss" is what the log line and the spike guard call the loss (pretraining:
  cross-entropy without z-loss), else it is loss_sum / count. The loop calls `loss` under autocast,
  once per micro-batch, with gradient sync handled outside.
- `objective.accumulation(seq_len, dp_world)` -> micro-batches per optimizer step on each rank.
- optional: `objective.describe_step(seq_len, dp_world)` -> what one optimizer step holds, in the
  objective's own units, for the Trainer's start line ("a step = ..."): pretraining and SFT
  "2 x 16 tokens x 2 accumulation x 1 data-parallel = 64 tokens", DPO "8 pairs = 4 x 2
  accumulation x 1 data-parallel". Without it the line counts what every objective shares:
  "2 micro-batches of at most 4 rows x 1 data-parallel".
- `objective.stateful()` -> extra checkpoint parts by name (anything with state_dict /
  load_state_dict: a rollout RNG, a reference-log-prob cache position), saved and restored
  by the loop beside the model, optimizer and loader. Each rank saves its own (torch.save of
  {name: state_dict}: tensors, numbers, strings, lists, dicts; read back with weights_only);
  after a layout change every rank reads rank 0's.
- optional: `objective.batch_phase` -> the word for the time `batches.next_batch()` takes in the log
  line's `time/<word>_s` (default "data", a wait on the loader; GRPO "rollouts": it generates).
- `objective.step_metrics()` -> a dict of already-global floats to add to the step's log line
  (rollout lengths, rewards per function), or {}.
- `objective.evaluate(model)` -> a dict of extra eval results (chat evals, preference accuracy,
  pass@k) merged into the periodic evaluation, or {}.

The in-training evaluation beyond the objective's own (validation loss, eval.tasks) lives above
train/ (eval/during_training.py): the stage's entry function hands it to the Trainer as an
`InTrainingEvaluation` (`check(config)` before anything is allocated, `evaluate(model, config, ctx)`
-> a dict, in eval mode without gradients); without one the Trainer evaluates the objective alone.

An objective is built after the model, by a factory the stage's entry function hands to the
Trainer: `build(config, model, ctx, run_dir) -> Objective` (GRPO samples from `model`; DPO runs its
reference pass before step 1 and keeps the result in `run_dir`, which exists by then). A factory
may carry `preflight(config, ctx)`, checks the Trainer runs before the model is built (pretraining:
every stage's batch splits over the data-parallel degree), so a mistake costs no allocation. A stage's
entry function is then one line, `Trainer(config, build_objective=build_sft_objective).train()`:
the loop reads train.* (max_steps, log/save/eval_every, out_dir, init, seed, spike guard,
precision, compile), optim.*, model.*, parallel.* and eval.* as pretraining does; the
objective's own settings live in its config section.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch
import torch.nn as nn

Metric = tuple[torch.Tensor | float, torch.Tensor | float]  # (sum, count)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class BatchSource(Protocol):
    seq_len: int
    stage: int

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def skip(self, num_batches: int) -> None: ...

    def set_stage(self, index: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Objective(Protocol):
    name: str  # "pretrain", "sft", "dpo", "grpo": written into metrics and the run summary
    batches: BatchSource

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Metric]]: ...

    def accumulation(self, seq_len: int, dp_world: int) -> int: ...

    def stateful(self) -> dict[str, Stateful]: ...

    def step_metrics(self) -> dict[str, Any]: ...

    def evaluate(self, model: nn.Module) -> dict[str, Any]: ...


class InTrainingEvaluation(Protocol):
    def check(self, config) -> None: ...

    def evaluate(self, model: nn.Module, config, ctx) -> dict[str, Any]: ...


__all__ = ["InTrainingEvaluation", "Objective", "BatchSource", "Stateful", "Metric"]
