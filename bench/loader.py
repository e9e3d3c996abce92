"""Loader benchmark: startup, delivered tokens/s and peak resident memory, as one JSON line.

    python bench/loader.py --data DIR --seq-len 4096 --batch 8 --steps 1000
    python bench/loader.py --data DIR --make-synthetic 2000000000 ...   # writes the dataset first if missing

The claim it checks: memory does not grow with dataset size or step count (SmolLM3 lost throughput to
an index that grew with the run), and startup does not read the dataset.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()  # before numpy/torch: startup as a user experiences it

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder (meta.json + .bin/.idx)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="micro-batch size")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--start-step", type=int, default=0, help="skip this many batches first (position independence)")
    p.add_argument("--dp-world", type=int, default=1)
    p.add_argument("--make-synthetic", type=float, default=None, metavar="TOKENS",
                   help="write a synthetic dataset of this many tokens into --data if it has no meta.json")
    p.add_argument("--vocab-size", type=int, default=32768, help="synthetic data: vocabulary (uint16 up to 65536)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="synthetic data: tokens per shard")
    args = p.parse_args()

    if args.make_synthetic and not (Path(args.data) / "meta.json").is_file():
        from rich.progress import Progress

        from smoltrain.data.synthetic import write_synthetic_shards

        total = int(args.make_synthetic)
        with Progress(transient=True) as progress:
            task = progress.add_task("synthetic shards", total=total)
            started = time.perf_counter()
            write_synthetic_shards(args.data, total, vocab_size=args.vocab_size, shard_tokens=args.shard_tokens,
                                   progress=lambda n: progress.advance(task, n))
        print(f"wrote {total:,} synthetic tokens to {args.data} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        # the numbers below come from a fresh process: writing must not count against peak memory
        argv = list(sys.argv)
        i = next(i for i, a in enumerate(argv) if a.startswith("--make-synthetic"))
        del argv[i : i + (1 if "=" in argv[i] else 2)]
        os.execv(sys.executable, [sys.executable] + argv)

    import numpy as np
    import torch

    from smoltrain.config import DataConfig
    from smoltrain.data.loader import TrainLoader

    rss_after_imports = rss_mb()
    started = time.perf_counter()
    loader = TrainLoader(DataConfig(sources={"data": args.data}, seq_len=args.seq_len), seed=0,
                         micro_batch_size=args.batch, dp_world=args.dp_world)
    loader.skip(args.start_step)
    loader.next_batch()
    startup_s = time.perf_counter() - started
    startup_with_imports_s = time.perf_counter() - _PROCESS_START

    checksum = 0
    started = time.perf_counter()
    for _ in range(args.steps):
        batch = loader.next_batch()
        checksum += int(batch["labels"][:, -1].sum())  # touch the data so nothing is optimised away
    elapsed = time.perf_counter() - started
    tokens = args.steps * args.batch * args.seq_len
    source = loader.sources["data"]
    print(json.dumps({
        "startup_s": round(startup_s, 4),
        "startup_with_imports_s": round(startup_with_imports_s, 3),
        "tokens_per_s": round(tokens / elapsed),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mb": round(rss_after_imports, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "steps": args.steps,
        "start_step": args.start_step,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "dataset_tokens": source.num_tokens,
        "dataset_shards": len(source.meta["shards"]),
        "dataset_documents": source.meta["num_documents"],
        "checksum": checksum,
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
