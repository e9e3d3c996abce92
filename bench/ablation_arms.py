"""The arms of one ablation file trained side by side in one process: tokens/s (wall and per CPU-second)
alternating in rounds, and each arm's peak memory in its own fresh child process.

An ablation's own runs follow each other, so on a shared machine their tokens/s measure the neighbours
as much as the arm; here the arms take turns on the same micro-batch, round after round, and a neighbour
slows them alike (the median round is reported, with the load average). Memory does not depend on load:
each arm runs a few steps in a child process and reports its peak resident set (VmHWM, reset after
building the data) above its resident set at that point (on CUDA, max_memory_allocated).

    python bench/ablation_arms.py recipes/ablations/dense-vs-moe.yaml --threads 1
    python bench/ablation_arms.py recipes/ablations/attention-vs-hybrid.yaml --rounds 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from smoltrain.ablate.spec import load_ablation
from smoltrain.data.loader import build_train_loader
from smoltrain.model.flops import parameter_counts
from smoltrain.model.transformer import build_model


def arm_step(config, device: str):
    """A training step (forward, backward, AdamW at the recipe's lr) of one arm on its first micro-batch."""
    torch.manual_seed(0)
    loader = build_train_loader(config)
    batch = {k: v.to(device) for k, v in loader.next_batch().items()}
    loader.close()
    model = build_model(config.model, seed=config.train.seed, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)

    def step() -> float:
        out = model(batch["input_ids"], labels=batch["labels"], document_ids=batch["document_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step, int((batch["labels"] != -100).sum())


def alternate(steps: dict, tokens: int, rounds: int, steps_per_round: int, warmup: int) -> dict:
    """Median tokens/s per arm, wall clock and per CPU-second, the arms taking turns each round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                step()
            wall[name].append(tokens * steps_per_round / (time.perf_counter() - start))
            cpu[name].append(tokens * steps_per_round / (time.process_time() - start_cpu))
    return {name: {"tokens_per_s": statistics.median(wall[name]), "tokens_per_cpu_s": statistics.median(cpu[name]),
                   "spread": (min(wall[name]), max(wall[name]))} for name in steps}


def peak_memory(path: str, variant: str, device: str, threads: int) -> float:
    """MiB above the data-ready baseline, of a few steps of one arm in a fresh child process."""
    out = subprocess.run([sys.executable, __file__, path, "--memory-of", variant, "--device", device, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(spec, variant: str, device: str) -> None:
    """(child process) build the data first, then the arm; print its peak in MiB above that point."""
    config = spec.config_for(variant, spec.seeds[0])
    build_train_loader(config).close()  # the embedded corpus and shards: equal for every arm, not the arm's
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # "5" resets the peak resident set (VmHWM) to the current one (Linux proc(5), clear_refs)
        Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step, _ = arm_step(config, device)
    for _ in range(3):
        step()
    if device == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print((_status_kib("VmHWM") - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ablation", help="an ablation file (recipes/ablations/)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child process of peak_memory
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_ablation(args.ablation)
    if args.memory_of:
        return measure_memory(spec, args.memory_of, args.device)

    configs = {variant: spec.config_for(variant, spec.seeds[0]) for variant in spec.variants}
    built = {variant: arm_step(config, args.device) for variant, config in configs.items()}
    tokens = next(iter(built.values()))[1]
    rates = alternate({v: step for v, (step, _) in built.items()}, tokens, args.rounds, args.steps_per_round, args.warmup)
    load = os.getloadavg()
    base = rates[next(iter(rates))]
    results = []
    for variant, rate in rates.items():
        counts = parameter_counts(configs[variant].model)
        memory = peak_memory(args.ablation, variant, args.device, args.threads)
        results.append({"variant": variant, "parameters": counts["total"], "active": counts.get("active", counts["total"]),
                        "peak_mib": memory, **rate, "ratio": rate["tokens_per_s"] / base["tokens_per_s"],
                        "ratio_cpu": rate["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]})
        print(f"{variant:18} {counts['total'] / 1e6:.2f}M | {rate['tokens_per_s']:7,.0f} tok/s ({results[-1]['ratio']:.2f}x) | "
              f"{rate['tokens_per_cpu_s']:7,.0f} tok/CPU-s ({results[-1]['ratio_cpu']:.2f}x) | peak +{memory:.0f} MiB")
    print(f"{args.device}, {args.threads} thread(s), micro-batch {configs[next(iter(configs))].train.micro_batch_size} x "
          f"{configs[next(iter(configs))].data.seq_len}, {args.rounds} rounds; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ablation": spec.name, "device": args.device, "threads": args.threads, "load": load, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
