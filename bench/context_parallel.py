"""Context parallelism on CPU gloo: the demo model on one long row per step, trained by the Trainer at
cp=1 (one process) and cp=2 (two ranks): peak RSS per rank, tokens/s, and the two loss curves.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/context_parallel.py [--seq 4096] [--steps 4]

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


def _overrides(out: Path, seq: int, steps: int, cp: int) -> list[str]:
    return [f"train.out_dir={out}", f"train.max_steps={steps}", "train.log_every=1", "train.save_every=100000",
            "train.eval_every=100000", "eval.val_batches=0", "eval.tasks=[]", "train.tensorboard=false",
            "train.device=cpu", "train.compile=off", "train.precision=fp32", f"data.seq_len={seq}",
            f"model.max_seq_len={seq}", f"train.global_batch_tokens={seq}", "train.micro_batch_size=1",
            f"parallel.cp={cp}"]


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


def run(recipe: str, seq: int, steps: int, cp: int, root: Path) -> dict:
    out = root / f"cp{cp}"
    mp.spawn(_worker, args=(cp, _port(), recipe, _overrides(out, seq, steps, cp), str(root)), nprocs=cp, join=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [m for m in lines if "loss" in m and "event" not in m]
    rss = [json.loads((root / f"rss_rank{r}.json").read_text()) for r in range(cp)]
    return {"loss": [m["loss"] for m in curve], "grad_norm": [m["grad_norm"] for m in curve],
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in curve[1:]), "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/demo.yaml")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {cp: run(args.recipe, args.seq, args.steps, cp, Path(tmp)) for cp in (1, 2)}
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
          f"max relative grad-norm diff {max(abs(a - b) / a for a, b in zip(one['grad_norm'], two['grad_norm'])):.2e}")


if __name__ == "__main__":
    main()
