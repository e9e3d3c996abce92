"""Loader and plan, with --recipe: the recipe's own loader on the real shards against what the plan
needs per node, the plan's memory per device against the measured free memory, and the most tokens/s
the measured matmul rate allows.

The need is the planner's tokens/s per device (at this device's spec peak and the plan's MFU; on a
device without a spec, at its measured matmul rate) x devices per node, and the loader is asked for
twice that: a loader that only just keeps up stalls the step whenever a read is slow.
"""

from __future__ import annotations

import time

from smoltrain.config import Config
from smoltrain.doctor.report import FAIL, INFO, OK, WARN, Check
from smoltrain.doctor.timing import Budget
from smoltrain.train.plan import plan

MARGIN = 2.0


def measure(config: Config, rank: int, world: int, budget: Budget) -> dict:
    """This rank's loader (its data-parallel slice) for budget.loader_s, after one warm-up batch."""
    from smoltrain.data.loader import build_train_loader

    loader = build_train_loader(config, dp_rank=rank, dp_world=world)
    try:
        loader.next_batch()
        batches, start = 0, time.perf_counter()
        while batches < 2 or time.perf_counter() - start < budget.loader_s:
            loader.next_batch()
            batches += 1
        seconds = time.perf_counter() - start
        tokens = batches * loader.micro_batch_size * loader.seq_len
    finally:
        loader.close()
    return {"batches": batches, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sizing(config: Config, world: int, peak_tflops: float) -> dict:
    """The plan at this device's peak for this world size."""
    return plan(config, gpus=world, peak_tflops=peak_tflops)


def _flops(rate: float) -> str:
    return f"{rate / 1e12:,.0f} TFLOP/s" if rate >= 1e13 else f"{rate / 1e9:,.1f} GFLOP/s"


def judge(config: Config, planned: dict, per_rank: list[dict], ranks_per_node: list[list[int]],
          free_bytes_per_device: float, matmul_flops: float, peak_source: str) -> list[Check]:
    """`matmul_flops`: the measured rate (FLOP/s) at the recipe's shapes in the trainer's precision."""
    checks = []
    per_device = planned["tokens_per_s_per_gpu"]
    devices = max(map(len, ranks_per_node))
    need = per_device * devices
    node_rates = [sum(per_rank[r]["tokens_per_s"] for r in members) for members in ranks_per_node]
    slowest = min(range(len(node_rates)), key=node_rates.__getitem__)
    rate = node_rates[slowest]
    status = OK if rate >= MARGIN * need else WARN if rate >= need else FAIL
    advice = {OK: "", WARN: "less than 2x headroom: a slow read will stall steps (local NVMe, warm page cache)",
              FAIL: "the loader cannot feed the plan: move shards to local NVMe and check the storage rows"}[status]
    node_text = f" (slowest of {len(node_rates)} nodes)" if len(node_rates) > 1 else ""
    checks.append(Check("loader", "loader tokens/s per node", f"{rate:,.0f} tokens/s{node_text}",
                        f"plan: {per_device:,.0f} tokens/s/device x {devices} = {need:,.0f}, x{MARGIN:g} margin",
                        status, advice, {"value": rate, "per_node": node_rates, "need": need,
                                         "per_rank": per_rank}))
    gib = 2**30
    memory = planned["memory_per_device_gb"]["total"]  # GiB, as the planner counts
    free = free_bytes_per_device / gib
    status = FAIL if memory > free else WARN if memory > 0.9 * free else OK
    advice = {OK: "", WARN: "under 10% headroom: fragmentation can run out of memory; lower train.micro_batch_size",
              FAIL: "will not fit: lower train.micro_batch_size, turn on activation checkpointing or shard wider"}[status]
    checks.append(Check("loader", "memory per device", f"plan {memory:,.1f} GiB", f"{free:,.1f} GiB free (measured)",
                        status, advice, {"value": memory, "free_gib": free, "plan": planned["memory_per_device_gb"]}))
    bound = matmul_flops / planned["flops_per_token"]
    status = OK if per_device <= 0.5 * bound else WARN if per_device <= bound else FAIL
    advice = {OK: "", WARN: f"the plan needs {100 * per_device / bound:.0f}% of the measured matmul rate; "
                            "30-50% is what good training steps reach",
              FAIL: "the plan's time is impossible on this device: re-plan with the measured rate "
                    "(smoltrain plan --peak-tflops)"}[status]
    checks.append(Check("loader", "tokens/s upper bound per device",
                        f"{bound:,.0f} tokens/s at the measured {_flops(matmul_flops)}",
                        f"plan assumes {per_device:,.0f} ({100 * planned['mfu']:.0f}% MFU of {peak_source})", status,
                        advice, {"value": bound, "plan_tokens_per_s": per_device}))
    checks.append(Check("loader", "plan", f"{planned['gpu_hours']:,.0f} device-hours, {planned['wall_clock_days']:.2f} "
                        f"days on {planned['gpus']} devices", f"{planned['total_tokens']:,.0f} tokens", INFO, "",
                        {"plan": {k: v for k, v in planned.items() if k != "stages"}}))
    return checks

