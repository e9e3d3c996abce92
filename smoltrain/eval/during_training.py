"""What the trainer runs every `train.eval_every` steps and on the final checkpoint: validation
loss and bits per byte per source, then the tasks of `config.eval` (none by default). The stage's
entry function hands it to the Trainer as `DuringTraining()` (train never imports eval).

Tasks are built once per process and reused, so every evaluation of a run scores the same items
with the same few-shot prompts; no progress bar, the trainer owns the console.
"""

from __future__ import annotations

import functools

import torch

from smoltrain.eval.run import resolve_tasks, score_tasks
from smoltrain.eval.scoring import load_tokenizer
from smoltrain.eval.suite import aggregate
from smoltrain.eval.validation import resolve_data_config, validation_per_source
from smoltrain.train.distributed import resolve_precision


@functools.lru_cache(maxsize=8)
def _tasks(specs: tuple[str, ...], limit: int | None, num_fewshot: int, seed: int, haystack_files: tuple[str, ...] = ()):
    return resolve_tasks(specs, limit, num_fewshot or None, seed, haystack_files=haystack_files)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(path)


def check_eval_config(config) -> None:
    """Everything the run's evaluations need, resolved before step 1 rather than at the first
    evaluation hours later: every eval task exists (with the same "did you mean" as `smoltrain
    eval`), prompts have a tokenizer, validation folders exist, and generative tasks are refused
    under sequence parallel (one token per forward cannot be split over TP ranks; log-likelihood
    tasks run under any layout)."""
    from pathlib import Path

    from smoltrain.errors import ConfigError

    e, d, p = config.eval, config.data, config.parallel
    tasks = _tasks(tuple(e.tasks), e.limit, e.num_fewshot, e.seed, tuple(e.haystack_files)) if e.tasks else []
    if tasks and not (d.tokenizer or d.embedded):
        raise ConfigError("eval.tasks needs data.tokenizer (or data.embedded) to turn prompts into tokens")
    if tasks and d.tokenizer and not d.embedded and not Path(d.tokenizer).exists():
        raise ConfigError(f"data.tokenizer: {d.tokenizer} not found (eval.tasks needs it)")
    if e.val_batches and d.validation and not d.embedded:
        if not d.tokenizer:
            raise ConfigError("data.tokenizer is needed to count bytes for bits per byte of data.validation "
                              "(or set eval.val_batches=0)")
        for source, folder in d.validation.items():
            if not Path(folder).is_dir():
                raise ConfigError(f"data.validation.{source}: folder {folder} not found")
    generative = [task.name for task in tasks if task.kind in ("generative", "long_context")]
    if generative and p.tp > 1 and p.sequence_parallel:
        raise ConfigError(f"eval.tasks: generative tasks ({', '.join(generative)}) decode one token at a time, "
                          f"which sequence parallel cannot split over parallel.tp ({p.tp}) ranks; set "
                          f"parallel.sequence_parallel=false, drop them, or evaluate checkpoints with `smoltrain eval`")


def sequence_multiple(config) -> int:
    """What every forward's sequence length must be a multiple of: sequence parallel splits the
    sequence over the TP ranks (a 19-token scoring batch cannot be halved)."""
    p = config.parallel
    return p.tp if p.tp > 1 and p.sequence_parallel else 1


def evaluate_during_training(model, config, device, data_parallel: tuple[int, int, object] | None = None,
                             precision: str | None = None) -> dict:
    """{"val": {source: {"loss", "bpb", "tokens"}}, "tasks": {name: {metric: value, "n"}}, "aggregate": {...}}.

    data_parallel = (dp_rank, dp_world, group) splits the validation batches and the
    multiple-choice requests over the data-parallel ranks. precision: the run's resolved one (the
    Trainer's ParallelContext holds it); None resolves train.precision here (a checkpoint scored alone)."""
    device = torch.device(device)
    if precision is None:
        precision = resolve_precision(config.train.precision, device, config.model, config.train.micro_batch_size * config.data.seq_len)
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    e = config.eval
    config = resolve_data_config(config)
    val = (validation_per_source(model, config, e.val_batches, e.batch_size, device, autocast_dtype, data_parallel)
           if e.val_batches else {})
    results = {}
    if e.tasks:
        if not config.data.tokenizer:
            from smoltrain.errors import ConfigError

            raise ConfigError("eval.tasks needs data.tokenizer (or data.embedded) to turn prompts into tokens")
        tasks = _tasks(tuple(e.tasks), e.limit, e.num_fewshot, e.seed, tuple(e.haystack_files))
        results = score_tasks(model, _tokenizer(config.data.tokenizer), tasks, e.batch_size, e.seed, device, progress=False,
                              data_parallel=data_parallel, pad_multiple=sequence_multiple(config), precision=precision)
    out = {"val": val, "tasks": results, "aggregate": aggregate(results)}
    if e.position_buckets and e.val_batches:  # the long-context perplexity curve (every rank scores it whole)
        from smoltrain.eval.longctx import loss_by_position_per_source

        out["loss_by_position"] = loss_by_position_per_source(model, config, e.val_batches, e.batch_size,
                                                              e.position_buckets, device)
    return out


class DuringTraining:
    """The in-training evaluation a stage hands the Trainer (train/objective.py's InTrainingEvaluation):
    checked before step 1, run with the run's device, precision and data-parallel group."""

    def check(self, config) -> None:
        check_eval_config(config)

    def evaluate(self, model, config, ctx) -> dict:
        data_parallel = (ctx.dp_rank, ctx.dp_world, ctx.flat_dp_mesh.get_group()) if ctx.dp_world > 1 else None
        return evaluate_during_training(model, config, ctx.device, data_parallel, precision=ctx.precision)


__all__ = ["DuringTraining", "check_eval_config", "evaluate_during_training", "sequence_multiple"]
