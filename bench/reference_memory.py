"""Memory per rank of DPO's reference at 2 gloo ranks: a full copy on every rank (load_any, before) against
the reference in the policy's FSDP layout (dpo.build_reference_model), same model, same pairs, same run.

Per rank: the reference's parameter bytes held, resident memory (RSS) after building it and after the
reference pass over --pairs pairs, and the process's peak RSS (both load the full weights once while
building: FSDP keeps its shard and frees the rest). Each mode runs in fresh processes.

    python bench/reference_memory.py                    # ~21M parameters, 32 pairs
    python bench/reference_memory.py --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _worker(rank: int, mode: str, root: str, port: int, pairs: int, out: str) -> None:
    import psutil
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from smoltrain.config import load_config
    from smoltrain.post.preference import stage as dpo
    from smoltrain.post.preference.data import Pair
    from smoltrain.train.distributed import setup_distributed
    from smoltrain.train.load_model import CONFIG_FILE, load_any

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    config = load_config(Path(root) / CONFIG_FILE)  # not load_any: that would load the weights here
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, init=root))  # the reference is the init
    ctx = setup_distributed(config.parallel, config.model, device="cpu", compile="off")
    me = psutil.Process()
    base = me.memory_info().rss
    if mode == "full copy":
        model = load_any(root)[0]
        model.requires_grad_(False)
    else:
        model = dpo.build_reference_model(root, config, ctx)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())
    built = me.memory_info().rss - base
    g = torch.Generator().manual_seed(rank)
    batch = [Pair(torch.randint(0, 4000, (32,), generator=g).tolist(), torch.randint(0, 4000, (96,), generator=g).tolist(),
                  torch.randint(0, 4000, (96,), generator=g).tolist()) for _ in range(pairs)]
    if mode == "full copy":
        dpo.sequence_logprobs(model, batch[rank::2], 4, 256, 0, ctx.device, "fp32")
    else:
        dpo._shared_logprobs(model, batch, 4, 256, 0, ctx, "fp32")
    after = me.memory_info().rss - base
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"{rank}.txt").write_text(f"{held} {built} {after} {peak}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--pairs", type=int, default=32)
    args = p.parse_args()

    import torch
    import torch.multiprocessing as mp

    from smoltrain.config import Config, DataConfig, ModelConfig
    from smoltrain.model.transformer import build_model
    from smoltrain.train.load_model import save_model_folder

    print(f"# bench/reference_memory.py  {datetime.date.today()}  {platform.machine()}  {os.cpu_count()} cores  "
          f"torch {torch.__version__}  2 gloo ranks")
    with tempfile.TemporaryDirectory() as tmp:
        model = ModelConfig(vocab_size=4096, hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                            intermediate_size=int(2.75 * args.hidden), max_seq_len=256)
        config = Config(model=model, data=DataConfig(seq_len=256))
        built = build_model(model, seed=0)
        total = sum(t.numel() for t in built.parameters())
        save_model_folder(built, config, Path(tmp) / "ref")
        del built
        print(f"reference: {total / 1e6:.1f}M parameters ({total * 4 / 1e6:.0f} MB float32), {args.pairs} pairs")
        print("| reference | rank | parameters held MB | RSS after build MB | RSS after pass MB | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for mode in ("full copy", "FSDP shard"):
            out = Path(tmp) / mode.replace(" ", "_")
            out.mkdir()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(mode, str(Path(tmp) / "ref"), port, args.pairs, str(out)), nprocs=2, join=True)
            for rank in range(2):
                held, built_mb, after, peak = (int(x) / 1e6 for x in (out / f"{rank}.txt").read_text().split())
                print(f"| {mode} | {rank} | {held:.0f} | {built_mb:.0f} | {after:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
