"""`smoltrain plan`: what a config costs before anything is allocated: parameters, FLOPs, memory
per device, and the playbook's sizing formula, GPUs = total FLOPs / (peak x MFU x time).

Defaults are SmolLM3's measured operating point: an H100 SXM (989 dense bf16 TFLOP/s, the MFU
table in train/metrics.py) at 30% MFU, i.e. ~14k tokens/s/GPU at 3B.
"""

from __future__ import annotations

import math

from smoltrain.config import Config
from smoltrain.data.stages import resolved_stages
from smoltrain.errors import ConfigError
from smoltrain.model.flops import flops_per_token, parameter_counts, training_memory_bytes
from smoltrain.train.context_parallel import check_context_parallel

DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16
DEFAULT_MFU = 0.30  # SmolLM3 on 384 H100s


def stage_segments(config: Config) -> list[dict]:
    """(name, first step, steps, seq_len) of each part of the run that has one sequence length."""
    starts = [0] + [stage.start_step for stage in config.data.stages]
    bounds = [(stage.name, start, stage.seq_len) for stage, start in zip(resolved_stages(config.data), starts)]
    if len(starts) > 1 and starts[1] == 0:  # the first stage replaces the data section from step 0
        bounds = bounds[1:]
    segments = []
    for i, (name, start, seq_len) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else config.train.max_steps
        end = min(end, config.train.max_steps)
        if end > start:
            segments.append({"name": name, "start_step": start, "steps": end - start, "seq_len": seq_len})
    return segments


def micro_batches_per_step(config: Config) -> int:
    """How many micro-batches every step of every stage splits into (their greatest common divisor):
    the data-parallel degree must divide it, each rank taking whole micro-batches."""
    t = config.train
    seq_lens = {config.data.seq_len} | {s.seq_len for s in config.data.stages if s.seq_len}
    counts = []
    for seq_len in sorted(seq_lens):
        if t.global_batch_tokens % (t.micro_batch_size * seq_len):
            raise ConfigError(f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of "
                              f"train.micro_batch_size x seq_len ({t.micro_batch_size} x {seq_len})")
        counts.append(t.global_batch_tokens // (t.micro_batch_size * seq_len))
    return math.gcd(*counts)


def launchable_gpus(config: Config) -> list[int]:
    """Every world size the run can start with, ascending: tp x a data-parallel degree that divides
    the micro-batches of a step and respects a fixed parallel.dp_replicate / dp_shard."""
    p = config.parallel
    rounds = micro_batches_per_step(config)
    degrees = [d for d in range(1, rounds + 1) if rounds % d == 0 and d % p.dp_replicate == 0
               and (p.dp_shard < 0 or d == p.dp_replicate * p.dp_shard)]
    return [d * p.tp * p.cp for d in degrees]


def _why(config: Config) -> str:
    t, p = config.train, config.parallel
    seq_lens = sorted({config.data.seq_len} | {s.seq_len for s in config.data.stages if s.seq_len})
    sequences = " and ".join(f"{t.global_batch_tokens // n:,} sequences" + (f" of {n}" if len(seq_lens) > 1 else "")
                             for n in seq_lens)
    fixed = f", parallel.dp_replicate {p.dp_replicate}" if p.dp_replicate > 1 else ""
    fixed += f", parallel.dp_shard {p.dp_shard}" if p.dp_shard > 0 else ""
    return (f"{sequences} per step at micro-batch {t.micro_batch_size} ({micro_batches_per_step(config)} "
            f"micro-batches) and parallel.tp {p.tp}{fixed}")


def resolve_gpus(config: Config, gpus: int | None, needed: int | None) -> tuple[int, str | None]:
    """(a world size the run can launch with, a note saying what was rounded and why, or None).
    `gpus`: asked for, refused unless launchable; `needed`: the count a deadline asks for, rounded up
    to the next launchable one (or down to the largest, when none is that large); neither: the smallest."""
    options = launchable_gpus(config)
    if not options:
        raise ConfigError(f"no world size can launch this config: {_why(config)}")
    if gpus is not None:
        if gpus not in options:
            below = [g for g in options if g < gpus][-1:]
            above = [g for g in options if g > gpus][:1]
            nearest = " or ".join(map(str, below + above))
            raise ConfigError(f"--gpus {gpus} cannot launch this config: the world size must be parallel.tp x a "
                              f"data-parallel degree dividing the micro-batches of a step ({_why(config)}); "
                              f"nearest: {nearest}")
        return gpus, None
    if needed is None:
        return options[0], (f"{options[0]} GPUs, the smallest layout ({_why(config)})" if options[0] > 1 else None)
    fitting = [g for g in options if g >= needed]
    if fitting:
        chosen = fitting[0]
        return chosen, (None if chosen == needed else
                        f"{needed:,} GPUs meet the deadline; rounded up to {chosen:,}, the next launchable layout "
                        f"({_why(config)})")
    chosen = options[-1]
    return chosen, (f"{needed:,} GPUs would meet the deadline, but {_why(config)} allow at most {chosen:,} "
                    f"({chosen // config.parallel.tp} data-parallel ranks x TP {config.parallel.tp}); "
                    f"a larger global batch (or smaller micro-batch) would allow more")


def plan(config: Config, gpus: int | None = None, mfu: float = DEFAULT_MFU, peak_tflops: float | None = None,
         days: float | None = None) -> dict:
    """Sizing of a run. With `days`, the GPU count that finishes in that time, rounded to one the run
    can launch with (`note` says what was rounded and why); otherwise the wall-clock time on `gpus`
    (default: the smallest launchable world size), which must be launchable."""
    if gpus is not None and days is not None:
        raise ConfigError("give --gpus (time the run on them) or --days (the GPUs a deadline needs), not both")
    m, t, p = config.model, config.train, config.parallel
    check_context_parallel(config, splits_sequences=True)  # a cp layout the Trainer refuses is not planned
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
    needed = max(1, math.ceil(gpu_seconds / (days * 86400))) if days is not None else None
    gpus, note = resolve_gpus(config, gpus, needed)
    dp_world = gpus // (p.tp * p.cp)
    # FSDP shards weights, gradients and optimizer state over dp_shard ranks and TP over tp more;
    # context-parallel ranks join the shard group (torchtitan's dp_shard x cp).
    dp_shard = 1 if p.ddp else dp_world // p.dp_replicate
    longest = max((s["seq_len"] for s in segments), default=config.data.seq_len)
    memory = training_memory_bytes(m, t.micro_batch_size, longest // p.cp, t.activation_checkpointing,
                                   num_shards=dp_shard * p.cp * p.tp, tensor_parallel=p.tp,
                                   checkpoint_every=t.activation_checkpointing_every,
                                   loss_parallel=p.loss_parallel)
    if p.cp > 1:  # every layer keeps the other ranks' gathered keys and values for its backward (bf16)
        kv_width = m.num_kv_heads * m.resolved_head_dim // p.tp
        gathered = m.num_layers * 2 * t.micro_batch_size * (longest - longest // p.cp) * kv_width * 2
        memory["activations"] += gathered
        memory["total"] += gathered
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
        "layout": {"dp_replicate": 1 if p.ddp else p.dp_replicate, "dp_shard": dp_shard, "cp": p.cp, "tp": p.tp,
                   "ddp": dp_world if p.ddp else 1},
        "gpus_needed": needed,
        "note": note,
        "wall_clock_days": gpu_seconds / gpus / 86400,
        "memory_per_device_gb": {k: v / 2**30 for k, v in memory.items()},
        "memory_assumes": {"micro_batch_size": t.micro_batch_size, "seq_len": longest,
                           "activation_checkpointing": t.activation_checkpointing,
                           "activation_checkpointing_every": t.activation_checkpointing_every,
                           "num_shards": dp_shard * p.cp * p.tp, "cp": p.cp},
    }


def _checkpointing(assumes: dict) -> str:
    if not assumes["activation_checkpointing"]:
        return "off"
    every = assumes["activation_checkpointing_every"]
    return "on" if every == 1 else f"on for every {every}th block"


def _layout(layout: dict) -> str:
    if layout["ddp"] > 1:
        parts = [f"DDP {layout['ddp']}"]
    else:
        parts = [f"dp_replicate {layout['dp_replicate']}"] if layout["dp_replicate"] > 1 else []
        parts += [f"dp_shard {layout['dp_shard']}"]
    parts += [f"cp {layout['cp']}"] if layout.get("cp", 1) > 1 else []
    return " x ".join(parts + [f"tp {layout['tp']}"])


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
        *([("active parameters", f"{_si(c['active'])} per token (memory counts the total, FLOPs and MFU the active)")]
          if c["active"] != c["total"] else []),
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
        ("  assuming", f"micro-batch {a['micro_batch_size']} x seq {a['seq_len']}"
                       + (f" split over cp {a['cp']} (+ gathered keys/values)" if a.get("cp", 1) > 1 else "")
                       + ", activation checkpointing "
                       f"{_checkpointing(a)}, sharded over {a['num_shards']}"),
        ("throughput", f"{_si(result['tokens_per_s_per_gpu'])} tokens/s/GPU at {100 * result['mfu']:.0f}% MFU "
                       f"of {result['peak_tflops']:g} TFLOP/s"),
        ("GPU-hours", f"{result['gpu_hours']:,.0f}"),
        ("GPUs", f"{result['gpus']:,} = " + _layout(result["layout"])),
        *([("  note", result["note"])] if result.get("note") else []),
        ("wall clock", f"{result['wall_clock_days']:.2f} days ({24 * result['wall_clock_days']:.1f} hours)"),
    ]
    table.add_column("what", style="bold")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    return table
