"""How the doctor times things: the median of blocks of calls, each block closed by a device sync.

The same scheme as torch.utils.benchmark's blocked_autorange (bench/doctor_honesty.py compares the
two on the same op): a block is long enough (~5% of the budget) that the sync and the clock cost
nothing, and the median of the blocks ignores a neighbour's burst on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], object], seconds: float, device: torch.device, warmup: int = 1) -> float:
    """Median seconds per call of fn() over about `seconds` of blocks (at least 3 blocks)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    one = time.perf_counter() - start
    per_block = max(1, int(seconds / 20 / max(one, 1e-9)))
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(per_block):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - t) / per_block)
    return statistics.median(times)


# ----------------------------------------------------------------------------- how long and how big


@dataclass(frozen=True)
class Budget:
    """Sizes and durations of every measurement; `budget_for` picks them, tests pass tiny ones."""

    matmul_size: int  # side of the square GEMM
    measure_s: float  # seconds per timed figure (matmul, copy)
    recipe_rows: int  # at most this many rows (tokens) in a recipe-shape GEMM; the rate is per row beyond
    copy_mb: int  # bytes moved per copy measurement
    sustained_s: float  # sustained-load run per device
    collective_max_mb: float  # largest collective message; the sweep goes down by 8x from it
    collective_s: float  # seconds per collective and size
    storage_mb: int  # sequential read per data folder
    storage_s: float  # seconds of random window reads per data folder
    write_mb: int  # checkpoint-write probe
    loader_s: float  # seconds of the recipe's loader


def budget_for(device: torch.device, quick: bool) -> Budget:
    """`--quick` stays under a minute on one node; on 2 CPU cores (fp32 ~40 GFLOP/s) it takes ~35 s."""
    if device.type == "cuda":
        if quick:
            return Budget(8192, 0.25, 16384, 1024, 10.0, 256, 0.2, 1024, 2.0, 512, 4.0)
        return Budget(8192, 1.0, 16384, 2048, 60.0, 1024, 0.5, 4096, 5.0, 2048, 20.0)
    if quick:
        return Budget(1024, 0.5, 512, 256, 5.0, 16, 0.2, 256, 1.0, 128, 3.0)
    return Budget(2048, 2.0, 2048, 512, 30.0, 64, 0.5, 1024, 3.0, 512, 10.0)
