"""Multi-stage curricula: which stage a step belongs to, and what a stage resolves to.

A stage inherits every field it leaves out from the stage before it (and stage 0 from the `data`
section), so the playbook's 3-stage recipe only writes down what changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from smoltrain.config import DataConfig


@dataclass(frozen=True)
class ResolvedStage:
    index: int  # -1: the `data` section itself (no stage has started yet)
    name: str
    mixture: dict[str, float]  # every source, weight 0 where unused
    seq_len: int


def stage_at(data: DataConfig, step: int) -> int:
    """Index of the stage active at `step`: the last one whose start_step <= step; -1 before the first."""
    index = -1
    for i, stage in enumerate(data.stages):
        if stage.start_step <= step:
            index = i
    return index


def resolve_stage(data: DataConfig, index: int) -> ResolvedStage:
    if not -1 <= index < len(data.stages):
        raise IndexError(f"stage {index} of {len(data.stages)}")
    mixture = dict(data.mixture) or {name: 1.0 for name in data.sources}
    seq_len, name = data.seq_len, "base"
    for stage in data.stages[: index + 1]:
        if stage.mixture:
            mixture = dict(stage.mixture)
        seq_len = stage.seq_len or seq_len
        name = stage.name
    return ResolvedStage(index, name, {s: float(mixture.get(s, 0.0)) for s in data.sources}, seq_len)
