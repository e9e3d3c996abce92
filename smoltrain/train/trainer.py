"""The one training loop: `Trainer(config, build_objective).train()` for pretraining, SFT, DPO and GRPO.

The loop knows nothing of the objective (train/objective.py): it asks it for micro-batches and for
a loss *sum* with its count, and divides the step's gradients by the count of the whole step,
all-reduced over data-parallel ranks, so a masked objective is not biased by how its tokens fall
into micro-batches and ranks. Nothing a step does depends on wall-clock or on how often the run was
stopped, so a resumed run reproduces the uninterrupted one bit for bit on CPU: the schedule is a
function of the step; the batch source's position, the optimizer, the spike statistics, the RNG
states and the objective's stateful parts are all in the checkpoint.

The same loop runs on one process or under torchrun: train/parallelize.py sets up the mesh and wraps
the model (FSDP2, TP, DDP); the loop adds only gradient sync on the last micro-batch, a
layout-independent gradient norm and data-parallel sums of the loss and counts. Every rank evaluates
(the forward has collectives), rank 0 alone writes files other than its checkpoint shards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from rich.console import Console

from smoltrain.config import Config, differences, save_config
from smoltrain.data.loader import check_validation_data
from smoltrain.data.stages import resolve_stage, stage_at
from smoltrain.errors import ConfigError, DataError
from smoltrain.files import write_json
from smoltrain.model.flops import flops_per_token
from smoltrain.model.modes import evaluating
from smoltrain.model.transformer import count_parameters
from smoltrain.train.checkpoint import (
    SHAPE_KEYS,
    check_compatible,
    crash_point,
    find_checkpoint,
    load_checkpoint,
    read_config,
    read_parts,
    read_train_state,
    rope_scaling_dict,
    save_checkpoint,
)
from smoltrain.train.context_parallel import check_context_parallel, split_batch
from smoltrain.train.distributed import (
    ParallelContext,
    check_layout,
    describe_layout,
    runtime_seed,
    setup_distributed,
    single_process_context,
)
from smoltrain.train.init_model import resolve_init_model
from smoltrain.train.metrics import MetricsLogger, SpikeDetector, console_line, eval_console_line, mfu, peak_tflops
from smoltrain.train.objective import InTrainingEvaluation, Objective
from smoltrain.train.optim import apply_hyperparameters, build_optimizer, clip_grad_norm_, lr_for_step, set_lr
from smoltrain.train.parallelize import build_parallel_model, load_full_state_dict, set_gradient_sync
from smoltrain.train.pretrain import build_pretrain_objective
from smoltrain.train.rank_watch import RankWatch
from smoltrain.train.router import router_step
from smoltrain.train.step_timer import MemoryWatch, StepTimer, describe_event

log = logging.getLogger(__name__)
console = Console(highlight=False, markup=False, soft_wrap=True)

ObjectiveFactory = Callable[[Config, nn.Module, ParallelContext, Path], Objective]


# ----------------------------------------------------------------------------- stages


def stage_rope_theta(config: Config, index: int) -> float:
    """The RoPE base in force at stage `index` (-1: before any stage): the last one a stage set."""
    return resolve_stage(config.data, index).rope_theta or config.model.rope_theta


def stage_rope_scaling(config: Config, index: int):
    """The RoPE scaling in force at stage `index`: the last one a stage set, else the model's own."""
    return resolve_stage(config.data, index).rope_scaling or config.model.rope_scaling


# ----------------------------------------------------------------------------- the model


def load_init_weights(model: nn.Module, path: str, config: Config) -> None:
    """Start from imported weights (a model folder, Hugging Face folder, run or checkpoint): every
    rank reads the full tensors and keeps its own shard, whatever the layout."""
    from smoltrain.train.load_model import load_any

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
    model = build_parallel_model(config, ctx or single_process_context(device, config.train), device)
    if init_from:
        load_init_weights(model, init_from, config)
    return model


# ----------------------------------------------------------------------------- one step, pure parts


class StepResult(NamedTuple):
    loss: float  # global: the objective's "loss" metric when it reports one, else loss sum / count
    grad_norm: float  # after normalisation by the step's count, before clipping
    tokens: int  # label tokens of the step over all ranks (labels != -100): label_tokens_per_s
    metrics: dict  # the objective's other metrics, global sum / global count
    all_tokens: int = 0  # every position the model ran (prompts and padding too): tokens_per_s and MFU


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def forward_backward(model: nn.Module, objective: Objective, micro_batches: list[dict], ctx: ParallelContext,
                     grad_clip: float, timer: StepTimer | None = None) -> StepResult:
    """Accumulate the gradients of the objective's loss sums over this rank's micro-batches, then
    divide them by the step's count summed over data- and context-parallel ranks (times grad_world:
    FSDP and DDP average gradients over those ranks) and clip. A context-parallel rank trains on its
    chunks of each row (split_batch), so its sums and counts are its share of the row's. Every returned
    number is global, identical on every rank. bf16 autocast is entered per forward, over float32
    master weights. `timer` times the micro-batch loop as the step's forward-backward; the all-reduce,
    clipping and the sync that reads the loss are the step's rest."""
    device = ctx.device
    autocast = ctx.autocast()
    # name -> (sum, count), float64 (counts beyond 2^24 stay exact); "" is the loss itself.
    sums = {"": torch.zeros(2, device=device, dtype=torch.float64)}
    tokens = torch.zeros(2, device=device, dtype=torch.float64)  # label tokens, all tokens
    if timer is not None:
        timer.begin("forward_backward")
    for i, batch in enumerate(micro_batches):
        # Data-parallel gradients are reduced once, after the last micro-batch, not after each.
        set_gradient_sync(model, i == len(micro_batches) - 1)
        batch = _to_device(batch, device)
        if ctx.cp > 1:
            batch = split_batch(batch, ctx, model.config.document_masking)
        with autocast:
            loss_sum, count, metrics = objective.loss(model, batch)
        loss_sum.backward()
        tokens[0] += (batch["labels"] != -100).sum()
        tokens[1] += batch["input_ids"].numel()
        for name, (value, n) in {"": (loss_sum, count), **metrics}.items():
            pair = sums.setdefault(name, torch.zeros(2, device=device, dtype=torch.float64))
            pair += torch.stack([torch.as_tensor(value, device=device).detach().double().reshape(()),
                                 torch.as_tensor(n, device=device).double().reshape(())])
    if timer is not None:
        timer.end("forward_backward")
    # One collective for everything: every rank must see the same loss, or the spike guard would
    # skip the update on some ranks only.
    names = list(sums)
    totals = ctx.all_reduce_batch(torch.cat([torch.stack([sums[n] for n in names]).flatten(), tokens]))
    label_tokens, all_tokens = (int(x) for x in totals[-2:].tolist())
    pairs = totals[:-2].view(-1, 2).tolist()
    values = {n: (s / c if c else float("nan")) for n, (s, c) in zip(names, pairs)}
    count = pairs[0][1]
    norm = clip_grad_norm_(model.parameters(), grad_clip, scale=ctx.grad_world / count if count else 1.0)
    loss = values.pop("loss", values[""])
    values.pop("")
    return StepResult(loss, norm.item(), label_tokens, values, all_tokens)


class Verdict(NamedTuple):
    action: str  # "update", "skip" (the data is consumed, the weights stay) or "rewind"
    event: str | None  # "nonfinite", "spike" or None (a normal step, whose loss joins the spike window)


def guard(loss: float, grad_norm: float, spike_threshold: float | None, spike_action: str = "warn") -> Verdict:
    """What to do with a step's gradients. A non-finite loss or gradient never reaches the weights;
    a loss above the spike threshold is handled as train.spike_action says (warn: update anyway,
    skip, or rewind to the last checkpoint and skip data)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return Verdict("skip", "nonfinite")
    if spike_threshold is not None and loss > spike_threshold:
        return Verdict({"warn": "update", "skip": "skip", "rewind": "rewind"}[spike_action], "spike")
    return Verdict("update", None)


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped updates included: their data was consumed)
    tokens: int = 0  # label tokens trained on
    loss: float | None = None
    elapsed_s: float = 0.0  # training wall time over all sessions
    skipped_steps: int = 0  # updates withheld: non-finite loss or gradient, or a skipped spike
    spikes: int = 0
    rewinds: int = 0
    rewind_target: int = -1  # checkpoint step of the last rewind, and how often we went there
    rewind_count: int = 0


@dataclass
class Interval:
    """Throughput bookkeeping between two log lines (not checkpointed: wall time is not state)."""

    tokens: int = 0  # label tokens
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    session_tokens: int = 0
    session_s: float = 0.0
    all_tokens: int = 0
    session_all_tokens: int = 0

    def close(self) -> float:
        elapsed = time.perf_counter() - self.start
        self.session_tokens += self.tokens
        self.session_all_tokens += self.all_tokens
        self.session_s += elapsed
        return elapsed

    def restart(self) -> None:
        self.tokens, self.all_tokens, self.steps, self.start = 0, 0, 0, time.perf_counter()


class StopSignal:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step (SLURM preemption,
    Ctrl-C). A second signal gets the default behaviour back."""

    def __init__(self, announce: bool = True):
        self.received: int | None = None
        self._previous = {}
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


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Parts built once in `__init__` (layout, model, optimizer, objective and its batches, spike
    guard, metrics), restored from the newest checkpoint when there is one; then `train()`.

    build_objective(config, model, ctx, run_dir) -> Objective: pretraining by default; SFT, DPO and
    GRPO hand their own. should_stop() -> bool: asked after every step (all ranks agree); True
    saves and stops, as SIGTERM does. resume: a run or checkpoint folder (default: the run folder's
    own latest checkpoint). evaluation: what runs every train.eval_every steps besides the objective's
    own evaluations (train/objective.py's InTrainingEvaluation; None: the objective's alone). Under
    torchrun the process group is started here unless one exists, and then ended by train() (also
    on errors)."""

    def __init__(self, config: Config, build_objective: ObjectiveFactory | None = None, resume: str | None = None,
                 should_stop: Callable[[], bool] | None = None, ctx: ParallelContext | None = None,
                 allow_data_change: bool = False, evaluation: InTrainingEvaluation | None = None):
        notes: list[str] = []
        config = resolve_init_model(config, say=notes.append)  # train.init defines the model section
        if evaluation is not None:
            evaluation.check(config)
        elif config.eval.tasks or (config.eval.val_batches and (config.data.validation or config.data.embedded)):
            notes.append("in-training evaluation: none was handed to the Trainer, so eval.* (validation loss, "
                         "eval.tasks) is not run; the objective's own evaluation is")
        check_context_parallel(config, getattr(build_objective or build_pretrain_objective, "splits_sequences", False))
        self.config, self.evaluation = config, evaluation
        self.should_stop = should_stop
        self.allow_data_change = allow_data_change
        self.owns_group = ctx is None and not (dist.is_available() and dist.is_initialized())
        t = config.train
        self.ctx = ctx or setup_distributed(config.parallel, config.model, seed=t.seed, device=t.device,
                                            precision=t.precision, compile=t.compile,
                                            tokens=t.micro_batch_size * config.data.seq_len)
        try:
            for note in notes:
                self.say(note)
            self._build(build_objective or build_pretrain_objective, resume)
        except BaseException:
            self._abort()
            raise

    def _build(self, build_objective: ObjectiveFactory, resume: str | None) -> None:
        config, ctx, t = self.config, self.ctx, self.config.train
        check_layout(config, ctx)
        if getattr(build_objective, "preflight", None):  # the objective's own checks, before any allocation
            build_objective.preflight(config, ctx)
        if config.eval.val_batches and (config.data.validation or config.data.embedded):
            check_validation_data(config)  # every input the run reads, checked before step 1
        self.device = ctx.device
        self.run_dir = Path(t.out_dir)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast
        checkpoint = find_checkpoint(resume if resume else self.run_dir, required=resume is not None)
        self.previous = None  # the config the checkpoint was written with
        if checkpoint is not None:
            check_compatible(checkpoint, config)
            self.previous = read_config(checkpoint)
        self.write_config(read_train_state(checkpoint)["step"] if checkpoint else 0)

        # setup_distributed seeded the runtime RNG per data-parallel rank; init does not use it.
        # A LoRA checkpoint holds the adapters alone: the frozen base comes from train.init on resume too.
        init_from = t.init if checkpoint is None or t.lora is not None else None
        self.model = build_training_model(config, self.device, init_from=init_from, ctx=ctx)
        if t.lora is not None:
            from smoltrain.train.lora import trainable_summary

            self.say(trainable_summary(self.model))
        self.optimizer = build_optimizer(config.optim, self.model)
        self.objective = build_objective(config, self.model, ctx, self.run_dir)
        self.batches = self.objective.batches
        self.spikes = SpikeDetector(t.spike_std, t.spike_window)
        self.state = TrainState()
        self.stage = self.batches.stage
        self.layout = [ctx.dp_replicate, ctx.dp_shard, ctx.tp] + ([ctx.cp] if ctx.cp > 1 else [])
        self.interval = Interval()
        self.stopped_by: str | None = None
        self.metrics = None
        self.events: list[dict] = []  # found before metrics.jsonl is open
        self.router: dict = {}  # the last step's router metrics (MoE models)
        self.build_diagnostics()
        if checkpoint is not None:
            self.restore(checkpoint)
            self.say(f"resumed from {checkpoint} (step {self.state.step}, {self.state.tokens:,} tokens)")
            self.check_schedule()
        else:
            self.model.set_rope(theta=stage_rope_theta(config, self.stage), max_seq_len=self.batches.seq_len,
                                scaling=stage_rope_scaling(config, self.stage))
            if t.init:
                self.say(f"initialised from {t.init}")
        self.peak = peak_tflops(self.device, t.peak_tflops)
        self.metrics = MetricsLogger(self.run_dir, enabled=ctx.is_main, tensorboard=t.tensorboard,
                                     start_step=self.state.step)
        for event in self.events:
            self.metrics.write({"step": self.state.step, **event})
        self.say(f"smoltrain train ({self.objective.name}): {count_parameters(self.model) / 1e6:.1f}M parameters | "
                 f"a step = {self.describe_step()} | {describe_layout(ctx)} | "
                 f"{self.device.type} {ctx.precision} | compile {'on' if ctx.compile else 'off'} | to step {t.max_steps} in {self.run_dir}")

    # ------------------------------------------------------------------------- small helpers

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            console.print(message)

    def write_config(self, step: int) -> None:
        """config.yaml is the config in force; config.history/step_<step>.yaml keeps the one each
        segment of the run started with, so a resume with other settings loses nothing. A resume
        prints what changed since the checkpoint was written."""
        if not self.ctx.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run_dir / "config.yaml")
        save_config(self.config, self.run_dir / "config.history" / f"step_{step:08d}.yaml")
        changed = differences(self.previous, self.config) if self.previous is not None else []
        if changed:
            listing = "; ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changed)
            console.print(f"resuming with a changed config (since step {step}): {listing} "
                          f"(each segment's config is kept in {self.run_dir / 'config.history'})")

    def check_schedule(self) -> None:
        """Warn when a resume with another schedule (longer max_steps, other stages) raises the lr
        over the one the run last trained with, after warmup: it re-enters a phase it had passed
        (a finished WSD decay goes back to the plateau)."""
        step, before = self.state.step, self.previous
        if before is None or step == 0 or step <= self.config.optim.warmup_steps:
            return
        last, now = lr_for_step(before, step - 1), lr_for_step(self.config, step)
        if now > last * (1 + 1e-6) and now != lr_for_step(before, step):
            self.say(f"warning: at step {step} the lr goes back up from {last:.3g} to {now:.3g} (train.max_steps "
                     f"{before.train.max_steps} -> {self.config.train.max_steps}): the schedule re-enters a phase "
                     f"the run had passed")
            self.events.append({"event": "schedule", "lr_before": last, "lr": now})

    def accumulation(self) -> int:
        return self.objective.accumulation(self.batches.seq_len, self.ctx.dp_world)

    def describe_step(self) -> str:
        """What one optimizer step holds: in the objective's own units (tokens, pairs) where it says
        (objective.py's optional describe_step), else micro-batches of rows, true of every objective."""
        describe = getattr(self.objective, "describe_step", None)
        if describe is not None:
            return describe(self.batches.seq_len, self.ctx.dp_world)
        return (f"{self.accumulation()} micro-batches of at most {self.config.train.micro_batch_size} rows x "
                f"{self.ctx.dp_world} data-parallel")

    def _abort(self) -> None:
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: a failing rank's peers may never reach it

    # ------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Train to train.max_steps (or until stopped); returns the summary, also in summary.json."""
        t = self.config.train
        try:
            with StopSignal(announce=self.ctx.is_main) as self.signals:
                while self.state.step < t.max_steps:
                    if not self.step():
                        continue  # rewound: the step is redone from the checkpoint
                    if _due(self.state.step, t.log_every, t.max_steps):
                        self.log_step()
                    stopping = self.stop_requested()
                    # Save before evaluating: an evaluation that crashes must not lose this step.
                    if _due(self.state.step, t.save_every, t.max_steps) or stopping:
                        self.save()
                    if _due(self.state.step, t.eval_every, t.max_steps):
                        self.evaluate()  # the final model is always evaluated
                    if stopping:
                        break
            summary = self.finish()
        except BaseException:
            self._abort()
            raise
        if self.owns_group:
            self.ctx.close()
        return summary

    def step(self) -> bool:
        """One optimizer step: the stage in force, the lr of this step, the objective's micro-batches,
        forward-backward, then the guard's verdict. False when the guard rewound instead."""
        config, state = self.config, self.state
        self.timer.start_step()
        self.enter_stage(stage_at(config.data, state.step))
        lr = lr_for_step(config, state.step)
        set_lr(self.optimizer, lr)
        with self.timer.phase(self.timer.batch_phase):
            micro_batches = [self.batches.next_batch() for _ in range(self.accumulation())]
        result = self.forward_backward(micro_batches)
        verdict = guard(result.loss, result.grad_norm, self.spikes.threshold(), config.train.spike_action)
        self.report(verdict, result)
        action = verdict.action
        if action == "rewind":
            self.optimizer.zero_grad(set_to_none=True)
            if self.rewind():
                return False
            self.say("no checkpoint to rewind to (or rewound there 3 times already): update skipped")
            action = "skip"
        self.router = router_step(self.model, self.ctx, config.model.bias_update_rate if action == "update" else 0.0)
        if action == "update":
            with self.timer.phase("optimizer"):
                self.optimizer.step()
        else:
            state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += result.tokens
        state.loss = result.loss
        self.last = (result, lr)
        self.interval.tokens += result.tokens
        self.interval.all_tokens += result.all_tokens
        self.interval.steps += 1
        self.timer.end_step()
        crash_point(f"after_step_{state.step}")
        return True

    def forward_backward(self, micro_batches: list[dict]) -> StepResult:
        return forward_backward(self.model, self.objective, micro_batches, self.ctx, self.config.optim.grad_clip,
                                self.timer)

    def report(self, verdict: Verdict, result: StepResult) -> None:
        """The guard's events into metrics.jsonl and the console; a normal loss joins the spike window
        (spikes never do, so one cannot raise the bar for the next)."""
        step, action = self.state.step + 1, self.config.train.spike_action
        if verdict.event == "nonfinite":
            self.metrics.write({"step": step, "event": "nonfinite", "loss": _finite(result.loss),
                                "grad_norm": _finite(result.grad_norm)})
            self.say(f"step {step}: non-finite loss or gradient, update skipped")
        elif verdict.event == "spike":
            self.state.spikes += 1
            threshold = self.spikes.threshold()
            self.metrics.write({"step": step, "event": "spike", "loss": result.loss, "threshold": threshold,
                                "action": action})
            self.say(f"step {step}: loss spike {result.loss:.4f} > {threshold:.4f} ({action})")
        else:
            self.spikes.update(result.loss)

    def enter_stage(self, index: int) -> None:
        """A new curriculum stage: mixture, and maybe sequence length and RoPE base."""
        if index == self.stage:
            return
        self.stage = index
        self.batches.set_stage(index)
        self.model.set_rope(theta=stage_rope_theta(self.config, index), max_seq_len=self.batches.seq_len,
                            scaling=stage_rope_scaling(self.config, index))
        self.metrics.write({"step": self.state.step, "event": "stage", "stage": index, "seq_len": self.batches.seq_len,
                            "rope_theta": self.model.rope_theta, "rope_scaling": rope_scaling_dict(self.model.rope_scaling)})
        self.say(f"stage {index} ({self.config.data.stages[index].name}) from step {self.state.step}: "
                 f"seq_len {self.batches.seq_len}, rope_theta {self.model.rope_theta:g}"
                 + (f", {scaling.rope_type} x{scaling.factor:g}" if (scaling := self.model.rope_scaling) else ""))

    def stop_requested(self) -> bool:
        """A signal or should_stop(); every rank must stop at the same step, so they agree (MAX)."""
        received = self.signals.received
        reason = signal.Signals(received).name if received else None
        if reason is None and self.should_stop is not None and self.should_stop():
            reason = "should_stop"
        flag = reason is not None
        if self.ctx.distributed:
            t = torch.tensor([int(flag)], device=self.device)  # NCCL needs a CUDA tensor
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.stopped_by = reason or "SIGTERM"  # another rank was signalled (torchrun signals all)
        return flag

    # ------------------------------------------------------------------------- logging

    def log_step(self) -> None:
        t, state, interval = self.config.train, self.state, self.interval
        result, lr = self.last
        elapsed = interval.close()
        state.elapsed_s += elapsed
        # tokens_per_s: every position the model ran (what MFU counts); label_tokens_per_s: those with a
        # loss (SFT's assistant tokens, DPO's answers: a fraction of the rows)
        tokens_per_s = interval.all_tokens / elapsed
        record = {
            "step": state.step, "tokens": state.tokens, "loss": _finite(result.loss), "lr": lr,
            "grad_norm": _finite(result.grad_norm), "tokens_per_s": tokens_per_s,
            "label_tokens_per_s": interval.tokens / elapsed,
            "mfu": mfu(tokens_per_s / self.ctx.world_size, flops_per_token(self.config.model, self.batches.seq_len),
                       self.peak),
            "elapsed_s": state.elapsed_s, "stage": self.stage, "skipped_steps": state.skipped_steps,
            **{name: _finite(value) for name, value in result.metrics.items()},
            **self.objective.step_metrics(),
            **self.router,
        }
        diagnostics, events = self.diagnostics(tokens_per_s)
        record.update(diagnostics)
        self.metrics.write(record)
        eta = (t.max_steps - state.step) * elapsed / interval.steps
        self.say(console_line({**record, "loss": result.loss, "grad_norm": result.grad_norm}, t.max_steps, eta))
        for event in events:
            self.metrics.write(event)
            self.say(describe_event(event))
        interval.restart()

    def build_diagnostics(self) -> None:
        """The step timer, memory watch and rank gather (its host names are gathered here, on every rank)."""
        self.timer = StepTimer(self.device, getattr(self.objective, "batch_phase", "data"))
        self.memory = MemoryWatch(self.device)
        self.ranks = RankWatch(self.device, self.ctx.world_size)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def diagnostics(self, tokens_per_s: float) -> tuple[dict, list[dict]]:
        """A log line's `time/`, `memory/` and `rank/` fields, the device and its achieved TFLOP/s (which
        `smoltrain doctor --run` sets against a measured matmul rate), and the events they raise
        (memory_growth, straggler). Every rank calls it: the rank gather is a collective."""
        step = self.state.step
        fields, figures = self.timer.read()
        memory, growth = self.memory.read(step)
        ranks, events = self.ranks.gather(step, figures)
        per_token = flops_per_token(self.config.model, self.batches.seq_len)
        fields.update(memory, **ranks, device=self.device_name, precision=self.ctx.precision,
                      tflops_per_device=tokens_per_s / self.ctx.world_size * per_token / 1e12)
        return fields, ([growth] if growth else []) + events

    # ------------------------------------------------------------------------- checkpoints

    def save(self) -> None:
        started = time.perf_counter()
        extra = {"loader": self.batches.state_dict(), "spike_window": self.spikes.state_dict(), "stage": self.stage,
                 "rope_theta": self.model.rope_theta, "rope_scaling": rope_scaling_dict(self.model.rope_scaling),
                 "dp_world": self.ctx.dp_world, "layout": self.layout,
                 "objective": self.objective.name}
        if hasattr(self.batches, "fingerprint"):
            extra["data_fingerprint"] = self.batches.fingerprint()
        parts = {name: part.state_dict() for name, part in self.objective.stateful().items()}
        save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer,
                        dict(dataclasses.asdict(self.state), **extra), self.config,
                        keep=self.config.train.keep_checkpoints, parts=parts)
        self.interval.start = time.perf_counter()  # saving is not training throughput
        self.timer.add("checkpoint", self.interval.start - started)

    def restore(self, path: Path) -> None:
        """Load a checkpoint into every part, whatever layout saved it: DCP reshards the weights and
        optimizer state, the batch source's position is in global units and is re-split for
        dp_world, and the objective's stateful parts are restored by name."""
        saved = read_train_state(path)
        same_layout = saved.get("layout", [1, saved.get("dp_world", 1), 1]) == self.layout
        saved = load_checkpoint(path, self.model, self.optimizer, restore_rng=same_layout)
        if not same_layout:
            # Rank r's saved RNG stream belonged to another (dp, tp) position: start fresh streams that
            # still differ per data-parallel rank and agree across TP peers, and move on with the step.
            torch.manual_seed(runtime_seed(self.config.train.seed + 1_000_003 * saved["step"], self.ctx.dp_rank))
        apply_hyperparameters(self.config.optim, self.optimizer)
        self.batches.load_state_dict(saved["loader"])
        self.check_data(saved.get("data_fingerprint"))
        self.spikes.load_state_dict(saved["spike_window"])
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state.__dict__.update({k: v for k, v in saved.items() if k in fields})
        parts = read_parts(path, same_layout)
        for name, part in self.objective.stateful().items():
            if name in parts:
                part.load_state_dict(parts[name])
            else:
                log.warning("checkpoint %s has no state for %r: it starts fresh", path, name)
        self.stage = saved["stage"]
        self.model.set_rope(theta=stage_rope_theta(self.config, self.stage), max_seq_len=self.batches.seq_len,
                            scaling=stage_rope_scaling(self.config, self.stage))

    def check_data(self, saved: dict | None) -> None:
        """The batch source's position refers to the data it was saved with: a source whose shards
        changed under the same name is refused, or with allow_data_change restarted from its start."""
        if not saved or not hasattr(self.batches, "fingerprint"):
            return
        now = self.batches.fingerprint()
        changed = sorted(name for name, fingerprint in saved.items() if name in now and now[name] != fingerprint)
        if not changed:
            return
        names = ", ".join(f"data.sources.{name}" for name in changed)
        if not self.allow_data_change:
            raise DataError(f"{names}: the data changed since the checkpoint (other shards, token counts or "
                            f"tokenizer), so its loader position points elsewhere; pass --allow-data-change to "
                            f"restart {'its' if len(changed) == 1 else 'their'} position")
        self.batches.restart_sources(changed)
        self.say(f"{names}: data changed since the checkpoint, position restarted (--allow-data-change)")
        self.events.append({"event": "data_change", "sources": changed})

    def rewind(self) -> bool:
        """Back to the latest checkpoint, then skip the next spike_skip_batches steps of data.
        Counters survive the rewind. At most 3 rewinds to the same checkpoint: a spike that survives
        skipping 3 x N batches is not the data's fault, and looping forever would hide it."""
        t, state = self.config.train, self.state
        target = find_checkpoint(self.run_dir)
        if target is None:
            return False
        target_step = read_train_state(target)["step"]
        repeats = state.rewind_count if state.rewind_target == target_step else 0
        if repeats >= 3:
            return False
        counters = dataclasses.replace(state)
        self.restore(target)
        state.spikes, state.skipped_steps, state.elapsed_s = counters.spikes, counters.skipped_steps, counters.elapsed_s
        state.rewinds, state.rewind_target, state.rewind_count = counters.rewinds + 1, target_step, repeats + 1
        self.batches.skip(t.spike_skip_batches * self.accumulation())
        self.metrics.restart_at(state.step, keep_events=True)
        self.metrics.write({"step": state.step, "event": "rewind", "skipped_batches": t.spike_skip_batches})
        self.say(f"rewound to step {state.step}, skipping the next {t.spike_skip_batches} batches")
        return True

    # ------------------------------------------------------------------------- evaluation and the end

    def evaluate(self) -> dict:
        """The evaluation the stage handed in (validation loss and bits per byte per source and
        eval.tasks: eval.during_training), plus the objective's own evaluations; batches and
        multiple-choice requests are split over the data-parallel ranks. Written to metrics.jsonl when there was anything to evaluate."""
        started = time.perf_counter()
        model = self.model
        with evaluating(model), torch.no_grad():
            result = self.evaluation.evaluate(model, self.config, self.ctx) if self.evaluation is not None else {}
            result.update(self.objective.evaluate(model))
        if any(result.get(key) for key in result if key != "aggregate"):  # nothing configured: no line
            self.metrics.write({"step": self.state.step, "eval": result})
            line = eval_console_line(self.state.step, result)
            if line:
                self.say(line)
        self.interval.start = time.perf_counter()  # evaluation time is not training throughput
        self.timer.add("eval", self.interval.start - started)
        return result

    def finish(self) -> dict:
        t, state = self.config.train, self.state
        self.metrics.close()
        self.batches.close()
        session = self.interval
        tokens_per_s = session.session_all_tokens / session.session_s if session.session_s else None
        label_tokens_per_s = session.session_tokens / session.session_s if session.session_s else None
        per_token = flops_per_token(self.config.model, self.batches.seq_len)
        summary = {
            "run_dir": str(self.run_dir), "objective": self.objective.name, "step": state.step,
            "max_steps": t.max_steps, "finished": state.step >= t.max_steps, "stopped_by": self.stopped_by,
            "tokens": state.tokens, "loss": _finite(state.loss), "tokens_per_s": tokens_per_s,
            "label_tokens_per_s": label_tokens_per_s,
            "mfu": mfu(tokens_per_s / self.ctx.world_size, per_token, self.peak) if tokens_per_s else None,
            "elapsed_s": state.elapsed_s, "skipped_steps": state.skipped_steps, "spikes": state.spikes,
            "rewinds": state.rewinds, "parameters": count_parameters(self.model),
        }
        if self.ctx.is_main:
            write_json(self.run_dir / "summary.json", summary)
        return summary


def run(config: Config, resume: str | None = None, should_stop: Callable[[], bool] | None = None,
        allow_data_change: bool = False, evaluation: InTrainingEvaluation | None = None) -> dict:
    """Pretrain `config` to train.max_steps, resuming from `resume` (a run or checkpoint folder) or
    from the run folder's own `latest` checkpoint. Returns a summary (also written to summary.json).
    A layout that cannot fit the world size fails before anything is allocated or any rank waits.
    evaluation: what runs every train.eval_every steps besides the objective's own (the callers
    above train/ pass eval.during_training.DuringTraining())."""
    return Trainer(config, resume=resume, should_stop=should_stop, allow_data_change=allow_data_change,
                   evaluation=evaluation).train()


__all__ = ["Trainer", "StepResult", "Verdict", "guard", "forward_backward", "run", "build_training_model", "TrainState"]
