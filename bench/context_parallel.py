"""Context parallelism on CPU gloo: the demo model on one long row per step, trained by the Trainer at
cp=1 (one process) and cp=2 (two ranks): peak RSS per rank, tokens/s, and the two loss curves.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/context_parallel.py [--seq 4096] [--steps 4]
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/context_parallel.py --layouts --seq 256 --steps 4

--layouts: the curves of dp_shard 2 x cp 2 (FSDP2) and dp_replicate 2 x cp 2 (HSDP) on 4 ranks against
one process instead (the suite tests cp 2 on 2 ranks only, to stay fast on 2 cores).

Each run is its own spawned process(es), so the peaks are the run's own; "start" is the peak RSS after
imports, before the Trainer. Tokens/s are medians over the steps after the first, and the ratio is
cp=2's over cp=1's: on CPU gloo each layer's key/value all-gather is a memory copy through a socket, so
this measures overhead, not the speed-up that more devices give on a GPU interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
from pathlib import Path

import torch.multiprocessing as mp


def _overrides(out: Path, seq: int, steps: int, parallel: dict, rows: int) -> list[str]:
    return [f"train.out_dir={out}", f"train.max_steps={steps}", "train.log_every=1", "train.save_every=100000",
            "train.eval_every=100000", "eval.val_batches=0", "eval.tasks=[]", "train.tensorboard=false",
            "train.device=cpu", "train.compile=off", "train.precision=fp32", f"data.seq_len={seq}",
            f"model.max_seq_len={seq}", f"train.global_batch_tokens={seq * rows}", "train.micro_batch_size=1",
            *[f"parallel.{k}={v}" for k, v in parallel.items()]]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(rank: int, world: int, port: int, recipe: str, overrides: list[str], out: str) -> None:
    import torch

    from smoltrain.config import load_config
    from smoltrain.train import trainer

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    config = load_config(recipe, overrides)
    start = _peak_mb()
    trainer.run(config)
    Path(out, f"rss_rank{rank}.json").write_text(json.dumps({"start_mb": start, "peak_mb": _peak_mb()}))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(recipe: str, seq: int, steps: int, parallel: dict, world: int, root: Path, rows: int = 1) -> dict:
    """One Trainer run on `world` spawned ranks, `rows` rows of `seq` tokens a step (1 a micro-batch)."""
    out = root / "_".join(f"{k}{v}" for k, v in parallel.items())
    mp.spawn(_worker, args=(world, _port(), recipe, _overrides(out, seq, steps, parallel, rows), str(root)), nprocs=world, join=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [m for m in lines if "loss" in m and "event" not in m]
    rss = [json.loads((root / f"rss_rank{r}.json").read_text()) for r in range(world)]
    return {"loss": [m["loss"] for m in curve], "grad_norm": [m["grad_norm"] for m in curve],
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in curve[1:]), "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/demo.yaml")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", action="store_true", help="4-rank dp x cp layouts against one process")
    args = parser.parse_args()
    if args.layouts:
        return compare_layouts(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = {cp: run(args.recipe, args.seq, args.steps, {"cp": cp}, cp, Path(tmp)) for cp in (1, 2)}
    for cp, r in results.items():
        peaks = ", ".join(f"rank {i}: peak {x['peak_mb']:.0f} MB ({x['peak_mb'] - x['start_mb']:.0f} MB over start)"
                          for i, x in enumerate(r["rss"]))
        print(f"cp={cp}: {r['tokens_per_s']:.0f} tokens/s | {peaks}")
        print(f"  loss {[round(x, 5) for x in r['loss']]} grad_norm {[round(x, 5) for x in r['grad_norm']]}")
    one, two = results[1], results[2]
    growth = [(two["rss"][i]["peak_mb"] - two["rss"][i]["start_mb"]) / (one["rss"][0]["peak_mb"] - one["rss"][0]["start_mb"])
              for i in range(2)]
    print(f"cp=2 / cp=1: tokens/s {two['tokens_per_s'] / one['tokens_per_s']:.2f}x, RSS growth per rank "
          f"{growth[0]:.2f}x / {growth[1]:.2f}x; max |loss diff| {max(abs(a - b) for a, b in zip(one['loss'], two['loss'])):.2e}, "
          f"max relative grad-norm diff {_norm_diff(one, two):.2e}")


def _norm_diff(one: dict, other: dict) -> float:
    return max(abs(a - b) / a for a, b in zip(one["grad_norm"], other["grad_norm"]))


def compare_layouts(args) -> None:
    layouts = {"dp_shard 2 x cp 2": {"cp": 2, "dp_shard": 2}, "dp_replicate 2 x cp 2": {"cp": 2, "dp_replicate": 2, "dp_shard": 1}}
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.recipe, args.seq, args.steps, {}, 1, Path(tmp), rows=2)  # 2 rows: one per dp rank
        for name, parallel in layouts.items():
            got = run(args.recipe, args.seq, args.steps, parallel, 4, Path(tmp), rows=2)
            print(f"{name} vs 1 process over {len(got['loss'])} steps: max |loss diff| "
                  f"{max(abs(a - b) for a, b in zip(one['loss'], got['loss'])):.2e}, max relative grad-norm diff "
                  f"{_norm_diff(one, got):.2e}")


if __name__ == "__main__":
    main()
