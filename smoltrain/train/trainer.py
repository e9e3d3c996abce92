"""Pretraining: `run(config)` walks one run top to bottom: build the parts, resume, loop, save.

A step consumes a fixed global batch of tokens (micro-batches x gradient accumulation x data
parallel ranks) and nothing it does depends on wall-clock or on how often the run was stopped, so
a resumed run reproduces the uninterrupted one bit for bit on CPU: the schedule is a function of
the step, the data loader's position, the optimizer, the spike statistics and RNG states are all
in the checkpoint.

The same loop runs on one process or under torchrun: train/parallelize.py sets up the mesh and
wraps the model (FSDP2, TP, DDP); the loop adds only gradient sync on the last micro-batch, a
layout-independent gradient norm and a data-parallel mean of the loss. Every rank evaluates (the
forward has collectives), rank 0 alone writes files other than its checkpoint shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from rich.console import Console

from smoltrain.config import Config, save_config
from smoltrain.data.stages import stage_at
from smoltrain.errors import ConfigError
from smoltrain.model.flops import flops_per_token
from smoltrain.model.transformer import count_parameters
from smoltrain.train.checkpoint import (
    SHAPE_KEYS,
    check_compatible,
    crash_point,
    find_checkpoint,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
)
from smoltrain.train.metrics import MetricsLogger, SpikeDetector, console_line, mfu, peak_tflops
from smoltrain.train.optim import apply_hyperparameters, build_optimizer, lr_for_step, set_lr
from smoltrain.train.parallelize import (
    ParallelContext,
    build_parallel_model,
    clip_grad_norm_,
    load_full_state_dict,
    runtime_seed,
    set_gradient_sync,
    setup_distributed,
)

log = logging.getLogger(__name__)
console = Console(highlight=False, markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------- devices and layout


def resolve_precision(requested: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if requested == "auto" else requested


def single_process_context(device: torch.device) -> ParallelContext:
    """The layout of a plain (non-torchrun) process, for callers that build parts without setup_distributed."""
    return ParallelContext(rank=0, local_rank=0, world_size=1, dp_replicate=1, dp_shard=1, tp=1, ddp=False,
                           device=device, mesh=None, seed=0)


def describe_layout(ctx: ParallelContext) -> str:
    if not ctx.distributed:
        return "1 process"
    dp = "DDP" if ctx.ddp else ("HSDP" if ctx.dp_replicate > 1 else "FSDP2")
    parts = [f"dp_replicate {ctx.dp_replicate}"] if ctx.dp_replicate > 1 else []
    parts += [f"dp_shard {ctx.dp_shard}"] if ctx.dp_shard > 1 else []
    parts += [f"tp {ctx.tp}"] if ctx.tp > 1 else []
    return f"{ctx.world_size} ranks = {' x '.join(parts)} ({dp if ctx.dp_world > 1 else 'TP'})"


def check_eval_layout(config: Config) -> None:
    """Generation decodes one token per forward, which sequence parallel cannot split over TP ranks,
    so generative eval tasks need parallel.sequence_parallel=false when tp > 1. Refused before the
    run starts, not at the first evaluation hours later (log-likelihood tasks run under any layout)."""
    if config.parallel.tp <= 1 or not config.parallel.sequence_parallel or not config.eval.tasks:
        return
    from smoltrain.eval.run import resolve_tasks

    e = config.eval
    generative = [task.name for task in resolve_tasks(e.tasks, e.limit, e.num_fewshot or None, e.seed)
                  if task.kind == "generative"]
    if generative:
        raise ConfigError(f"eval.tasks: generative tasks ({', '.join(generative)}) decode one token at a time, "
                          f"which sequence parallel cannot split over parallel.tp ({config.parallel.tp}) ranks; set "
                          f"parallel.sequence_parallel=false, drop them, or evaluate checkpoints with `smoltrain eval`")


def stage_seq_lens(config: Config) -> list[int]:
    seq_lens, current = [config.data.seq_len], config.data.seq_len
    for stage in config.data.stages:
        current = stage.seq_len or current
        seq_lens.append(current)
    return seq_lens


def grad_accumulation(config: Config, seq_len: int, dp_world: int) -> int:
    per_step = config.train.micro_batch_size * seq_len * dp_world
    if config.train.global_batch_tokens % per_step:
        raise ConfigError(
            f"train.global_batch_tokens ({config.train.global_batch_tokens}) must be a multiple of "
            f"train.micro_batch_size x seq_len x data-parallel ranks "
            f"({config.train.micro_batch_size} x {seq_len} x {dp_world} = {per_step})"
        )
    return config.train.global_batch_tokens // per_step


def stage_rope_theta(config: Config, index: int) -> float:
    """The RoPE base in force at stage `index` (-1: before any stage): the last one a stage set."""
    theta = config.model.rope_theta
    for stage in config.data.stages[: index + 1]:
        theta = stage.rope_theta or theta
    return theta


# ----------------------------------------------------------------------------- parts


def load_init_weights(model: nn.Module, path: str, config: Config) -> None:
    """Start from imported weights (a model folder, Hugging Face folder, run or checkpoint): every
    rank reads the full tensors and keeps its own shard, whatever the layout."""
    from smoltrain.model.hf import load_any

    source, source_config, _ = load_any(path)
    diffs = [f"model.{k} is {getattr(source_config.model, k)} there, {getattr(config.model, k)} here"
             for k in SHAPE_KEYS if getattr(source_config.model, k) != getattr(config.model, k)]
    if diffs:
        raise ConfigError(f"train.init: {path} has another model shape ({'; '.join(diffs)})")
    load_full_state_dict(model, source.state_dict())


def build_training_model(config: Config, device: torch.device, init_from: str | None = None,
                         ctx: ParallelContext | None = None) -> nn.Module:
    """The model as training runs it, built by train/parallelize.py in torchtitan's order: (TP) ->
    activation checkpointing -> per-block compile -> (FSDP2 | DDP), initialised from (seed, names)
    whatever the layout, then overwritten by `init_from` when given. One process: build_model's
    weights exactly (the recipe's distributed steps are skipped)."""
    model = build_parallel_model(config, ctx or single_process_context(device), device)
    if init_from:
        load_init_weights(model, init_from, config)
    return model


def build_loader(config: Config, dp_rank: int, dp_world: int):
    from smoltrain.data.loader import build_train_loader

    return build_train_loader(config, dp_rank, dp_world)


# ----------------------------------------------------------------------------- one step


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def forward_backward(model: nn.Module, micro_batches: list[dict], device: torch.device, precision: str,
                     grad_clip: float, ctx: ParallelContext | None = None) -> tuple[float, float]:
    """Accumulate gradients over this rank's micro-batches (mean loss), clip; returns the global
    (loss, grad norm), identical on every rank. bf16 autocast is entered per forward, over float32
    master weights."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        # Data-parallel gradients are reduced once, after the last micro-batch, not after each.
        set_gradient_sync(model, i == len(micro_batches) - 1)
        batch = _to_device(batch, device)
        with autocast:
            out = model(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"])
        (out.loss / len(micro_batches)).backward()
        total += out.ce_loss.detach()
    loss = total / len(micro_batches)
    if ctx is not None and ctx.distributed:
        # Every rank must see the same loss, or the spike guard would skip the update on some ranks only.
        loss = ctx.all_reduce_dp(loss)
        # FSDP x TP gradients live on several meshes; torch's clip cannot combine their norms.
        norm = clip_grad_norm_(model.parameters(), grad_clip)
    else:
        # max_norm=inf measures without clipping; the norm is needed anyway for the non-finite guard.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    return loss.item(), norm.item()


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped updates included: their data was consumed)
    tokens: int = 0
    loss: float | None = None
    elapsed_s: float = 0.0  # training wall time over all sessions
    skipped_steps: int = 0  # updates withheld: non-finite loss or gradient, or a skipped spike
    spikes: int = 0
    rewinds: int = 0
    rewind_target: int = -1  # checkpoint step of the last rewind, and how often we went there
    rewind_count: int = 0


class StopSignal:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step (SLURM preemption,
    Ctrl-C). A second signal gets the default behaviour back."""

    def __init__(self, device: torch.device = torch.device("cpu"), announce: bool = True):
        self.received: int | None = None
        self._previous = {}
        self.device = device  # where the agreement's all-reduce runs (NCCL needs CUDA tensors)
        self.announce = announce  # torchrun signals every rank; one line is enough

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.announce:
            console.print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized():  # every rank must stop at the same step
            t = torch.tensor([int(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def evaluate(model: nn.Module, config: Config, ctx: ParallelContext) -> dict:
    """Periodic evaluation (validation loss and bits per byte per source, tasks) from the eval package;
    validation batches and multiple-choice requests are split over the data-parallel ranks."""
    from smoltrain.eval.during_training import evaluate_during_training

    data_parallel = (ctx.dp_rank, ctx.dp_world, ctx.flat_dp_mesh.get_group()) if ctx.dp_world > 1 else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = evaluate_during_training(model, config, ctx.device, data_parallel)
    model.train(was_training)
    return result


# ----------------------------------------------------------------------------- the run


def run(config: Config, resume: str | None = None) -> dict:
    """Train `config` to train.max_steps, resuming from `resume` (a run or checkpoint folder) or
    from the run folder's own `latest` checkpoint. Returns a summary (also written to summary.json).

    Under torchrun this starts the process group (and ends it when done, also on errors) unless the
    caller started one already. A layout that cannot fit the world size fails before anything is
    allocated or any rank waits for another."""
    check_eval_layout(config)
    owns_group = not (dist.is_available() and dist.is_initialized())
    ctx = setup_distributed(config.parallel, config.model, seed=config.train.seed, device=config.train.device)
    try:
        summary = _train(config, ctx, resume)
    except BaseException:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: a failing rank's peers may never reach it
        raise
    if owns_group:
        ctx.close()
    return summary


def _train(config: Config, ctx: ParallelContext, resume: str | None) -> dict:
    t = config.train
    device = ctx.device
    precision = resolve_precision(t.precision, device)
    world, dp_rank, dp_world = ctx.world_size, ctx.dp_rank, ctx.dp_world
    main = ctx.is_main
    accum = {seq_len: grad_accumulation(config, seq_len, dp_world) for seq_len in stage_seq_lens(config)}
    run_dir = Path(t.out_dir)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast

    checkpoint = find_checkpoint(resume if resume else run_dir, required=resume is not None)
    if checkpoint is not None:
        check_compatible(checkpoint, config)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    # Build the parts. (setup_distributed seeded the runtime RNG per data-parallel rank; init does not use it.)
    model = build_training_model(config, device, init_from=None if checkpoint else t.init, ctx=ctx)
    optimizer = build_optimizer(config.optim, model)
    loader = build_loader(config, dp_rank, dp_world)
    spikes = SpikeDetector(t.spike_std, t.spike_window)
    state = TrainState()
    stage = loader.stage

    layout = [ctx.dp_replicate, ctx.dp_shard, ctx.tp]

    def restore(path: Path) -> None:
        """Load a checkpoint into every part, whatever layout saved it: DCP reshards the weights and
        optimizer state, the loader's position is in global sequences and is re-split for dp_world."""
        nonlocal stage
        saved = read_train_state(path)
        same_layout = saved.get("layout", [1, saved.get("dp_world", 1), 1]) == layout
        saved = load_checkpoint(path, model, optimizer, restore_rng=same_layout)
        if not same_layout:
            # Rank r's saved RNG stream belonged to another (dp, tp) position: start fresh streams that
            # still differ per data-parallel rank and agree across TP peers, and move on with the step.
            torch.manual_seed(runtime_seed(t.seed + 1_000_003 * saved["step"], dp_rank))
        apply_hyperparameters(config.optim, optimizer)
        loader.load_state_dict(saved["loader"])
        spikes.load_state_dict(saved["spike_window"])
        fields = {f.name for f in dataclasses.fields(TrainState)}
        state.__dict__.update({k: v for k, v in saved.items() if k in fields})
        stage = saved["stage"]
        model.set_rope(theta=stage_rope_theta(config, stage), max_seq_len=loader.seq_len)

    def save() -> None:
        extra = {"loader": loader.state_dict(), "spike_window": spikes.state_dict(), "stage": stage,
                 "rope_theta": model.rope_theta, "dp_world": dp_world, "layout": layout}
        save_checkpoint(run_dir, state.step, model, optimizer, dict(dataclasses.asdict(state), **extra), config,
                        keep=t.keep_checkpoints)

    def rewind() -> bool:
        """Back to the latest checkpoint, then skip the next spike_skip_batches batches of data.
        Counters survive the rewind. At most 3 rewinds to the same checkpoint: a spike that survives
        skipping 3 x N batches is not the data's fault, and looping forever would hide it."""
        target = find_checkpoint(run_dir)
        if target is None:
            return False
        target_step = read_train_state(target)["step"]
        repeats = state.rewind_count if state.rewind_target == target_step else 0
        if repeats >= 3:
            return False
        counters = dataclasses.replace(state)
        restore(target)
        state.spikes, state.skipped_steps, state.elapsed_s = counters.spikes, counters.skipped_steps, counters.elapsed_s
        state.rewinds, state.rewind_target, state.rewind_count = counters.rewinds + 1, target_step, repeats + 1
        loader.skip(t.spike_skip_batches * accum[loader.seq_len])
        metrics.restart_at(state.step, keep_events=True)
        metrics.write({"step": state.step, "event": "rewind", "skipped_batches": t.spike_skip_batches})
        say(f"rewound to step {state.step}, skipping the next {t.spike_skip_batches} batches")
        return True

    def say(message: str) -> None:
        if main:
            console.print(message)

    if checkpoint is not None:
        restore(checkpoint)
        say(f"resumed from {checkpoint} (step {state.step}, {state.tokens:,} tokens)")
    else:
        model.set_rope(theta=stage_rope_theta(config, stage), max_seq_len=loader.seq_len)
        if t.init:
            say(f"initialised from {t.init}")

    peak = peak_tflops(device, t.peak_tflops)
    metrics = MetricsLogger(run_dir, enabled=main, tensorboard=t.tensorboard, start_step=state.step)
    say(f"smoltrain train: {count_parameters(model) / 1e6:.1f}M parameters | "
            f"{t.global_batch_tokens:,} tokens/step = {t.micro_batch_size} x {loader.seq_len} x "
            f"{accum[loader.seq_len]} accumulation x {dp_world} data-parallel | {describe_layout(ctx)} | "
            f"{device.type} {precision} | "
            f"compile {t.compile} | to step {t.max_steps} in {run_dir}")

    # Loop.
    session_tokens, session_time = 0, 0.0
    interval_tokens, interval_steps, interval_start = 0, 0, time.perf_counter()
    stopped_by = None
    with StopSignal(device, announce=main) as stop:
        while state.step < t.max_steps:
            index = stage_at(config.data, state.step)
            if index != stage:  # a new curriculum stage: mixture, and maybe sequence length and RoPE base
                stage = index
                loader.set_stage(stage)
                model.set_rope(theta=stage_rope_theta(config, stage), max_seq_len=loader.seq_len)
                metrics.write({"step": state.step, "event": "stage", "stage": stage, "seq_len": loader.seq_len,
                               "rope_theta": model.rope_theta})
                say(f"stage {stage} ({config.data.stages[stage].name}) from step {state.step}: "
                    f"seq_len {loader.seq_len}, rope_theta {model.rope_theta:g}")

            lr = lr_for_step(config, state.step)
            set_lr(optimizer, lr)
            micro_batches = [loader.next_batch() for _ in range(accum[loader.seq_len])]
            loss, grad_norm = forward_backward(model, micro_batches, device, precision, config.optim.grad_clip, ctx)

            # The guard: a non-finite loss or gradient never reaches the weights; a spike is handled
            # as train.spike_action says (warn: update anyway, skip, or rewind and skip data).
            action = "update"
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                action = "skip"
                metrics.write({"step": state.step + 1, "event": "nonfinite", "loss": _finite(loss),
                               "grad_norm": _finite(grad_norm)})
                say(f"step {state.step + 1}: non-finite loss or gradient, update skipped")
            elif spikes.is_spike(loss):
                action = {"warn": "update", "skip": "skip", "rewind": "rewind"}[t.spike_action]
                state.spikes += 1
                metrics.write({"step": state.step + 1, "event": "spike", "loss": loss,
                               "threshold": spikes.threshold(), "action": t.spike_action})
                say(f"step {state.step + 1}: loss spike {loss:.4f} > {spikes.threshold():.4f} ({t.spike_action})")
            else:
                spikes.update(loss)  # spikes never raise the bar for the next one
            if action == "rewind":
                optimizer.zero_grad(set_to_none=True)
                if rewind():
                    continue
                say("no checkpoint to rewind to (or rewound there 3 times already): update skipped")
                action = "skip"
            if action == "update":
                optimizer.step()
            else:
                state.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += t.global_batch_tokens
            state.loss = loss
            interval_tokens += t.global_batch_tokens
            interval_steps += 1
            crash_point(f"after_step_{state.step}")

            if state.step % t.log_every == 0 or state.step == t.max_steps:
                elapsed = time.perf_counter() - interval_start
                session_tokens += interval_tokens
                session_time += elapsed
                state.elapsed_s += elapsed
                tokens_per_s = interval_tokens / elapsed
                seq_len = loader.seq_len
                record = {
                    "step": state.step, "tokens": state.tokens, "loss": _finite(loss), "lr": lr,
                    "grad_norm": _finite(grad_norm), "tokens_per_s": tokens_per_s,
                    "mfu": mfu(tokens_per_s / world, flops_per_token(config.model, seq_len), peak),
                    "elapsed_s": state.elapsed_s, "stage": stage, "skipped_steps": state.skipped_steps,
                }
                if device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                metrics.write(record)
                eta = (t.max_steps - state.step) * elapsed / interval_steps
                say(console_line({**record, "loss": loss, "grad_norm": grad_norm}, t.max_steps, eta))
                interval_tokens, interval_steps, interval_start = 0, 0, time.perf_counter()

            if state.step % t.eval_every == 0 or state.step == t.max_steps:  # the final model is always evaluated
                result = evaluate(model, config, ctx)
                if result["val"] or result["tasks"]:  # nothing configured to evaluate: no line
                    metrics.write({"step": state.step, "eval": result})
                interval_start = time.perf_counter()  # evaluation time is not training throughput

            stopping = stop.requested()
            if state.step % t.save_every == 0 or state.step == t.max_steps or stopping:
                save()
                interval_start = time.perf_counter()
            if stopping:
                stopped_by = signal.Signals(stop.received).name if stop.received else "SIGTERM"
                break

    metrics.close()
    loader.close()
    tokens_per_s = session_tokens / session_time if session_time else None
    summary = {
        "run_dir": str(run_dir), "step": state.step, "max_steps": t.max_steps,
        "finished": state.step >= t.max_steps, "stopped_by": stopped_by, "tokens": state.tokens,
        "loss": _finite(state.loss), "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s / world, flops_per_token(config.model, loader.seq_len), peak) if tokens_per_s else None,
        "elapsed_s": state.elapsed_s, "skipped_steps": state.skipped_steps, "spikes": state.spikes,
        "rewinds": state.rewinds, "parameters": count_parameters(model),
    }
    if main:
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "summary.json")
    return summary
