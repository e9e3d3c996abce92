"""Multi-stage curricula: which stage a step belongs to, and what a stage resolves to.

A stage inherits every field it leaves out from the stage before it (and stage 0 from the `data`
section), so the playbook's 3-stage recipe only writes down what changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from smoltrain.config import DataConfig, RopeScaling


@dataclass(frozen=True)
class ResolvedStage:
    index: int  # -1: the `data` section itself (no stage has started yet)
    name: str
    mixture: dict[str, float]  # every source, weight 0 where unused
    seq_len: int
    rope_theta: float | None  # the RoPE base a stage set (ABF), None: the model's own
    lr: float | None  # peak lr of the schedule in force, None: optim.lr
    schedule_start: int  # step its warmup/decay began: 0, or the start of the last stage that reset it
    schedule_end: int | None  # start of the next stage that resets the schedule, None: train.max_steps
    rope_scaling: RopeScaling | None = None  # the RoPE scaling a stage set (rope_type default: off), None: the model's own


def stage_at(data: DataConfig, step: int) -> int:
    """Index of the stage active at `step`: the last one whose start_step <= step; -1 before the first."""
    index = -1
    for i, stage in enumerate(data.stages):
        if stage.start_step <= step:
            index = i
    return index


def resolve_stage(data: DataConfig, index: int) -> ResolvedStage:
    """Stage `index` with every field it left out taken from the stages before it: the one place
    where stage inheritance is computed (loader, trainer, schedule, plan and report ask here)."""
    if not -1 <= index < len(data.stages):
        raise IndexError(f"stage {index} of {len(data.stages)}")
    mixture = dict(data.mixture) or {name: 1.0 for name in data.sources}
    seq_len, name, rope_theta, rope_scaling, lr, start = data.seq_len, "base", None, None, None, 0
    for stage in data.stages[: index + 1]:
        if stage.mixture:
            mixture = dict(stage.mixture)
        seq_len = stage.seq_len or seq_len
        rope_theta = stage.rope_theta or rope_theta
        rope_scaling = stage.rope_scaling or rope_scaling
        if stage.reset_schedule:  # a fresh schedule at the stage's own peak (optim.lr unless it sets one)
            lr, start = stage.lr, stage.start_step
        name = stage.name
    end = next((s.start_step for s in data.stages[index + 1 :] if s.reset_schedule), None)
    return ResolvedStage(index, name, {s: float(mixture.get(s, 0.0)) for s in data.sources}, seq_len, rope_theta,
                         lr, start, end, rope_scaling)


def resolved_stages(data: DataConfig) -> list[ResolvedStage]:
    """The data section (-1) and every stage, resolved."""
    return [resolve_stage(data, i) for i in range(-1, len(data.stages))]


def stage_seq_lens(data: DataConfig) -> list[int]:
    """The sequence length of the data section and of every stage after it."""
    return [stage.seq_len for stage in resolved_stages(data)]
