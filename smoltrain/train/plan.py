"""`smoltrain plan`: what a config costs before anything is allocated: parameters, FLOPs, memory
per device, and the playbook's sizing formula, GPUs = total FLOPs / (peak x MFU x time).

Defaults are SmolLM3's measured operating point: an H100 SXM (989 dense bf16 TFLOP/s, the MFU
table in train/metrics.py) at 30% MFU, i.e. ~14k tokens/s/GPU at 3B.
"""

from __future__ import annotations

import math

from smoltrain.config import Config
from smoltrain.model.flops import flops_per_token, parameter_counts, training_memory_bytes

DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16
DEFAULT_MFU = 0.30  # SmolLM3 on 384 H100s


def stage_segments(config: Config) -> list[dict]:
    """(name, first step, steps, seq_len) of each part of the run that has one sequence length."""
    bounds = [("base", 0, config.data.seq_len)]
    seq_len = config.data.seq_len
    for stage in config.data.stages:
        seq_len = stage.seq_len or seq_len
        if stage.start_step == 0:
            bounds = []
        bounds.append((stage.name, stage.start_step, seq_len))
    segments = []
    for i, (name, start, seq_len) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else config.train.max_steps
        end = min(end, config.train.max_steps)
        if end > start:
            segments.append({"name": name, "start_step": start, "steps": end - start, "seq_len": seq_len})
    return segments


def plan(config: Config, gpus: int | None = None, mfu: float = DEFAULT_MFU, peak_tflops: float | None = None,
         days: float | None = None) -> dict:
    """Sizing of a run. With `days`, the GPU count that finishes in that time; otherwise the
    wall-clock time on `gpus` (default 1)."""
    m, t, p = config.model, config.train, config.parallel
    peak = peak_tflops or t.peak_tflops or DEFAULT_PEAK_TFLOPS
    counts = parameter_counts(m)
    segments = stage_segments(config)
    for s in segments:
        s["tokens"] = s["steps"] * t.global_batch_tokens
        s["flops_per_token"] = flops_per_token(m, s["seq_len"])
        s["flops"] = s["tokens"] * s["flops_per_token"]
    total_tokens = sum(s["tokens"] for s in segments)
    total_flops = sum(s["flops"] for s in segments)
    achieved = peak * 1e12 * mfu  # FLOP/s per GPU
    gpu_seconds = total_flops / achieved
    if days is not None:
        gpus = max(1, math.ceil(gpu_seconds / (days * 86400)))
    gpus = gpus or 1
    # FSDP shards weights, gradients and optimizer state over dp_shard ranks and TP over tp more.
    dp_shard = 1 if p.ddp else (p.dp_shard if p.dp_shard > 0 else max(1, gpus // (p.dp_replicate * p.tp)))
    longest = max((s["seq_len"] for s in segments), default=config.data.seq_len)
    memory = training_memory_bytes(m, t.micro_batch_size, longest, t.activation_checkpointing,
                                   num_shards=dp_shard * p.tp, tensor_parallel=p.tp,
                                   checkpoint_every=t.activation_checkpointing_every,
                                   loss_parallel=p.loss_parallel)
    mean_flops_per_token = total_flops / total_tokens if total_tokens else flops_per_token(m, config.data.seq_len)
    return {
        "parameters": counts,
        "flops_per_token": mean_flops_per_token,
        "total_tokens": total_tokens,
        "total_flops": total_flops,
        "stages": segments,
        "peak_tflops": peak,
        "mfu": mfu,
        "tokens_per_s_per_gpu": achieved / mean_flops_per_token,
        "gpu_hours": gpu_seconds / 3600,
        "gpus": gpus,
        "wall_clock_days": gpu_seconds / gpus / 86400,
        "memory_per_device_gb": {k: v / 2**30 for k, v in memory.items()},
        "memory_assumes": {"micro_batch_size": t.micro_batch_size, "seq_len": longest,
                           "activation_checkpointing": t.activation_checkpointing,
                           "activation_checkpointing_every": t.activation_checkpointing_every,
                           "num_shards": dp_shard * p.tp},
    }


def _checkpointing(assumes: dict) -> str:
    if not assumes["activation_checkpointing"]:
        return "off"
    every = assumes["activation_checkpointing_every"]
    return "on" if every == 1 else f"on for every {every}th block"


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plan_table(result: dict):
    """The plan as a rich Table."""
    from rich.table import Table

    table = Table(title="smoltrain plan", show_header=False)
    c = result["parameters"]
    rows = [
        ("parameters", f"{_si(c['total'])} ({_si(c['non_embedding'])} non-embedding, {_si(c['embedding'])} embedding)"),
        ("FLOPs per token", f"{_si(result['flops_per_token'])} (6 x {_si(c['matmul'])} matmul params + attention)"),
        ("tokens", _si(result["total_tokens"])),
        ("total FLOPs", f"{result['total_flops']:.3e}"),
    ]
    for s in result["stages"]:
        rows.append((f"  stage {s['name']}", f"{s['steps']:,} steps at seq {s['seq_len']}: {_si(s['tokens'])} tokens"))
    mem = result["memory_per_device_gb"]
    a = result["memory_assumes"]
    rows += [
        ("memory per device", f"{mem['total']:.1f} GiB (weights {mem['weights']:.1f}, grads {mem['gradients']:.1f}, "
                              f"AdamW {mem['optimizer']:.1f}, activations {mem['activations']:.1f})"),
        ("  assuming", f"micro-batch {a['micro_batch_size']} x seq {a['seq_len']}, activation checkpointing "
                       f"{_checkpointing(a)}, sharded over {a['num_shards']}"),
        ("throughput", f"{_si(result['tokens_per_s_per_gpu'])} tokens/s/GPU at {100 * result['mfu']:.0f}% MFU "
                       f"of {result['peak_tflops']:g} TFLOP/s"),
        ("GPU-hours", f"{result['gpu_hours']:,.0f}"),
        ("GPUs", str(result["gpus"])),
        ("wall clock", f"{result['wall_clock_days']:.2f} days ({24 * result['wall_clock_days']:.1f} hours)"),
    ]
    table.add_column("what", style="bold")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    return table
