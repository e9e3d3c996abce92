"""What the trainer runs every `train.eval_every` steps and on the final checkpoint: validation
loss and bits per byte per source, then the tasks of `config.eval` (none by default).

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


@functools.lru_cache(maxsize=8)
def _tasks(specs: tuple[str, ...], limit: int | None, num_fewshot: int, seed: int):
    return resolve_tasks(specs, limit, num_fewshot or None, seed)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(path)


def sequence_multiple(config) -> int:
    """What every forward's sequence length must be a multiple of: sequence parallel splits the
    sequence over the TP ranks (a 19-token scoring batch cannot be halved)."""
    p = config.parallel
    return p.tp if p.tp > 1 and p.sequence_parallel else 1


def evaluate_during_training(model, config, device, data_parallel: tuple[int, int, object] | None = None) -> dict:
    """{"val": {source: {"loss", "bpb", "tokens"}}, "tasks": {name: {metric: value, "n"}}, "aggregate": {...}}.

    data_parallel = (dp_rank, dp_world, group) splits the validation batches and the
    multiple-choice requests over the data-parallel ranks."""
    device = torch.device(device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and config.train.precision != "fp32" else None
    e = config.eval
    config = resolve_data_config(config)
    val = (validation_per_source(model, config, e.val_batches, e.batch_size, device, autocast_dtype, data_parallel)
           if e.val_batches else {})
    results = {}
    if e.tasks:
        if not config.data.tokenizer:
            from smoltrain.errors import ConfigError

            raise ConfigError("eval.tasks needs data.tokenizer (or data.embedded) to turn prompts into tokens")
        tasks = _tasks(tuple(e.tasks), e.limit, e.num_fewshot, e.seed)
        results = score_tasks(model, _tokenizer(config.data.tokenizer), tasks, e.batch_size, e.seed, device, progress=False,
                              data_parallel=data_parallel, pad_multiple=sequence_multiple(config))
    return {"val": val, "tasks": results, "aggregate": aggregate(results)}
