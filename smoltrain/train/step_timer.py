"""Where a training step's time goes (`time/...`: data wait, forward-backward, optimizer, the rest,
checkpoints, evaluation) and how memory moves (`memory/...`), per logged step of metrics.jsonl.

Nothing here waits for the device on the hot path: on CPU every phase is a wall clock; on CUDA the
forward-backward and optimizer phases are pairs of events queued with the work and read at log time,
when the log line has already waited for the step's loss. Data wait is always a host clock: it is
the time the loop spent getting batches, which on a GPU is time the device had nothing queued.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

import psutil
import torch

DEVICE_PHASES = ("forward_backward", "optimizer")  # timed on the device on CUDA, on the wall clock on CPU
# A climb is judged over this many logged values once the first WARMUP_LOGS are past: the allocator's
# caches, AdamW's moments (made at the first step) and compile fill memory then, and that is no leak.
CLIMB_WINDOW, WARMUP_LOGS = 8, 3
CLIMB_RISING_SHARE = 0.8  # of the window's consecutive pairs that must rise (RSS jitters by a page or two)
CLIMB_MIN_GB, CLIMB_MIN_SHARE = 0.05, 0.05  # and the window rises by 50 MB and 5% at least


class StepTimer:
    """start_step(); `with phase(batch_phase|"forward_backward"|"optimizer")` (or begin(name) ... end(name)
    where a `with` would re-indent a loop); end_step() on every step;
    add("checkpoint"|"eval", seconds) for work between steps; read() at log time returns the
    interval's per-step means and starts a new interval. batch_phase names the time spent getting the
    step's batches: "data" (waiting on the loader), or the objective's own word where it makes them
    (GRPO: "rollouts", generation, which is no data wait)."""

    def __init__(self, device: torch.device, batch_phase: str = "data"):
        self.cuda = device.type == "cuda"
        self.batch_phase = batch_phase
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.wall = {"step": 0.0, self.batch_phase: 0.0, **{name: 0.0 for name in DEVICE_PHASES}}
        self.between = {"checkpoint": 0.0, "eval": 0.0}
        self.busy_cpu_s = 0.0  # process CPU time in the device phases: a rank waiting on its peers spends none
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def begin(self, name: str) -> None:
        self._open = (name, time.perf_counter(), time.process_time(), self._event() if name in DEVICE_PHASES else None)

    def end(self, name: str) -> None:
        opened, wall, cpu, start = self._open
        assert opened == name, f"phase {name} ended while {opened} was open"
        if start is not None:
            end = self._event()
            self.events.append((name, start, end))
        else:
            self.wall[name] += time.perf_counter() - wall
        if name in DEVICE_PHASES:
            self.busy_cpu_s += time.process_time() - cpu

    @contextmanager
    def phase(self, name: str):
        self.begin(name)
        yield
        self.end(name)

    def _event(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def end_step(self) -> None:
        self.wall["step"] += time.perf_counter() - self._step_start
        self.steps += 1

    def add(self, what: str, seconds: float) -> None:
        self.between[what] += seconds

    def read(self) -> tuple[dict, list[float]]:
        """(the `time/` fields: per-step means of the interval, and its checkpoint and evaluation
        totals when there were any; this rank's [step_s, batch_s, busy_s] for the rank gather)."""
        if self.events:
            self.events[-1][2].synchronize()  # the last phase's end: every earlier event is complete too
            for name, start, end in self.events:
                self.wall[name] += start.elapsed_time(end) / 1000
        n = max(self.steps, 1)
        means = {name: seconds / n for name, seconds in self.wall.items()}
        batches = means[self.batch_phase]
        phases = batches + sum(means[name] for name in DEVICE_PHASES)
        fields = {f"time/{name}_s": value for name, value in means.items()}
        # The rest: the guard, zero_grad, the stop check's all-reduce and, on CUDA, the host time the
        # device ran ahead of; clipped at 0 where event times and wall clocks disagree by a little.
        fields["time/other_s"] = max(0.0, means["step"] - phases)
        fields.update({f"time/{what}_s": seconds for what, seconds in self.between.items() if seconds})
        if self.cuda:
            busy = phases  # event times include waiting on NCCL: see the straggler note in run_watch.py
        else:
            busy = batches + self.busy_cpu_s / n
        figures = [means["step"], batches, busy]
        self._reset()
        return fields, figures


class MemoryWatch:
    """Memory per logged step: on CUDA the interval's peak allocated and reserved bytes and what stays
    allocated after the step; on CPU the process's resident memory. A steady climb is reported once,
    as an event, with the window that showed it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.run_peak_gb = 0.0
        self.recent: deque[tuple[int, float]] = deque(maxlen=CLIMB_WINDOW)
        self.logs = 0
        self.reported = False

    def read(self, step: int) -> tuple[dict, dict | None]:
        """(the `memory/` fields, a memory_growth event or None)."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 1e9
            self.run_peak_gb = max(self.run_peak_gb, peak)
            fields = {"memory/peak_allocated_gb": peak,
                      "memory/peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 1e9,
                      "memory/allocated_gb": torch.cuda.memory_allocated(self.device) / 1e9,
                      "peak_memory_gb": self.run_peak_gb}  # the whole run's peak, as before
            torch.cuda.reset_peak_memory_stats(self.device)
            level = fields["memory/allocated_gb"]
        else:
            level = psutil.Process().memory_info().rss / 1e9
            fields = {"memory/rss_gb": level}
        self.logs += 1
        if self.logs > WARMUP_LOGS:
            self.recent.append((step, level))
        climb = memory_climb(list(self.recent)) if not self.reported else None
        if climb is None:
            return fields, None
        self.reported = True
        return fields, {"step": step, "event": "memory_growth", **climb}


def memory_climb(points: list[tuple[int, float]]) -> dict | None:
    """A steady climb of (step, GB) points: at least CLIMB_WINDOW of them, rising in CLIMB_RISING_SHARE of
    consecutive pairs and by CLIMB_MIN_GB and CLIMB_MIN_SHARE overall; None otherwise."""
    if len(points) < CLIMB_WINDOW:
        return None
    values = [v for _, v in points]
    rising = sum(b > a for a, b in zip(values, values[1:])) / (len(values) - 1)
    rise = values[-1] - values[0]
    if rising < CLIMB_RISING_SHARE or rise < max(CLIMB_MIN_GB, CLIMB_MIN_SHARE * values[0]):
        return None
    (first, start), (last, end) = points[0], points[-1]
    return {"from_step": first, "to_step": last, "start_gb": start, "end_gb": end,
            "mb_per_step": 1000 * rise / max(last - first, 1)}


def describe_event(event: dict) -> str:
    """The console line of a memory_growth or straggler event."""
    if event["event"] == "memory_growth":
        return (f"step {event['step']}: memory climbing, {event['start_gb']:.2f} -> {event['end_gb']:.2f} GB over steps "
                f"{event['from_step']}-{event['to_step']} ({event['mb_per_step']:.1f} MB/step)")
    return (f"step {event['step']}: rank {event['rank']} ({event['host']}) is a straggler: busy "
            f"{100 * event['slower_by']:.0f}% longer than the other ranks' median for {event['logs']} logged steps")


__all__ = ["StepTimer", "MemoryWatch", "memory_climb", "describe_event", "CLIMB_WINDOW", "WARMUP_LOGS"]
