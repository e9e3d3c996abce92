"""Which rank is slow: one small all-gather per logged step of every rank's step time, data wait and
busy time, the slowest and fastest rank (with its host) in metrics.jsonl, and `event: straggler`.

A synchronous step takes every rank as long as the slowest, so the wall time of a step cannot name
the slow one; the time a rank spends working can: its data wait plus, on CPU, the process CPU time of
its forward-backward and optimizer (a rank blocked in a gloo collective burns none). On CUDA the
event times of those phases include waiting on NCCL, so a GPU that computes slowly shows in its
peers' waits, not in its own figure: there the rank figures catch host-side stragglers (a slow loader,
a busy CPU); GPU clocks are `smoltrain doctor`'s sustained-load check before the run.
"""

from __future__ import annotations

import platform
import statistics

import torch
import torch.distributed as dist

# A rank is a straggler when its busy time exceeds the median of the other ranks' by more than
# STRAGGLER_SHARE for STRAGGLER_LOGS logged steps in a row (one slow interval is a hiccup: a page
# fault, a neighbour's job; a throttled GPU cost SmolLM3 350 -> 100 GB/s of all-reduce for hours).
STRAGGLER_SHARE, STRAGGLER_LOGS = 0.25, 3
# And by at least 10 ms a step: below that a scheduler hiccup on a shared CPU is as large (a 2-layer test
# model's step is ~12 ms of CPU; real steps are 100s of ms).
STRAGGLER_MIN_S = 0.01


class RankWatch:
    """gather(figures) at each logged step on every rank (a collective): returns the `rank/` fields
    and any straggler events. One process: nothing is gathered and nothing returned."""

    def __init__(self, device: torch.device, world_size: int):
        self.world = world_size
        self.device = device
        self.hosts = [platform.node()]
        if world_size > 1:
            self.hosts = [None] * world_size
            dist.all_gather_object(self.hosts, platform.node())  # once, at start: not on the hot path
        self.slow_logs = [0] * world_size

    def gather(self, step: int, figures: list[float]) -> tuple[dict, list[dict]]:
        if self.world == 1:
            return {}, []
        mine = torch.tensor(figures, dtype=torch.float64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        rows = [t.tolist() for t in everyone]  # [step_s, data_s, busy_s] per rank
        busy = [row[2] for row in rows]
        slowest, fastest = max(range(self.world), key=busy.__getitem__), min(range(self.world), key=busy.__getitem__)
        fields = {"rank/slowest": slowest, "rank/slowest_host": self.hosts[slowest], "rank/slowest_busy_s": busy[slowest],
                  "rank/slowest_data_s": rows[slowest][1], "rank/fastest": fastest,
                  "rank/fastest_host": self.hosts[fastest], "rank/fastest_busy_s": busy[fastest],
                  "rank/median_busy_s": statistics.median(busy)}
        return fields, self._stragglers(step, busy)

    def _stragglers(self, step: int, busy: list[float]) -> list[dict]:
        events = []
        for rank, mine in enumerate(busy):
            others = statistics.median(busy[:rank] + busy[rank + 1:])
            slower_by = mine / others - 1 if others > 0 else 0.0
            slow = slower_by > STRAGGLER_SHARE and mine - others > STRAGGLER_MIN_S
            self.slow_logs[rank] = self.slow_logs[rank] + 1 if slow else 0
            if self.slow_logs[rank] == STRAGGLER_LOGS:  # once per slow stretch; a recovery re-arms it
                events.append({"step": step, "event": "straggler", "rank": rank, "host": self.hosts[rank],
                               "slower_by": slower_by, "busy_s": mine, "others_median_s": others,
                               "logs": STRAGGLER_LOGS})
        return events


__all__ = ["RankWatch", "STRAGGLER_SHARE", "STRAGGLER_LOGS", "STRAGGLER_MIN_S"]
