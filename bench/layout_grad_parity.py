"""Step-1 gradients of the demo recipe under 1 process, DDP 2 and FSDP2 2 (gloo, CPU): the global
grad norm as the trainer computes it (optim.clip_grad_norm_, the same function for every layout),
in float64 over the full gradients, and the largest per-parameter gradient differences.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/layout_grad_parity.py [recipes/demo.yaml]
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/layout_grad_parity.py recipes/demo.yaml --steps 30

With --steps N: the trainer's loss and grad-norm curves (log every step) under FSDP2 over 2 ranks
against one process.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _config(recipe: str, parallel: dict):
    from smoltrain.config import load_config

    return load_config(recipe, [f"parallel.{k}={v}" for k, v in parallel.items()] + ["train.device=cpu"])


def step_one(recipe: str, parallel: dict, out: str | None) -> None:
    from torch.distributed.tensor import DTensor

    from smoltrain.model.transformer import canonical_name
    from smoltrain.train import trainer
    from smoltrain.train.distributed import setup_distributed
    from smoltrain.train.pretrain import build_pretrain_objective

    torch.set_num_threads(1)
    config = _config(recipe, parallel)
    t = config.train
    ctx = setup_distributed(config.parallel, config.model, seed=t.seed, device="cpu", precision=t.precision,
                            compile=t.compile)
    model = trainer.build_training_model(config, ctx.device, ctx=ctx)
    objective = build_pretrain_objective(config, model, ctx, Path(tempfile.mkdtemp()))
    model.set_rope(theta=config.model.rope_theta, max_seq_len=objective.batches.seq_len)
    batches = [objective.batches.next_batch() for _ in range(objective.accumulation(objective.batches.seq_len, ctx.dp_world))]
    result = trainer.forward_backward(model, objective, batches, ctx, 0.0)  # grad_clip 0: measure only
    loss, norm = result.loss, result.grad_norm
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[canonical_name(name)] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    if ctx.rank == 0 and out:
        torch.save({"loss": loss, "norm": norm, "grads": grads}, out)
    if ctx.distributed:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, recipe: str, parallel: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    step_one(recipe, parallel, out)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curve_overrides(out: str, steps: int) -> list[str]:
    return [f"train.out_dir={out}", f"train.max_steps={steps}", "train.log_every=1", "train.save_every=100000",
            "train.eval_every=100000", "eval.val_batches=0", "eval.tasks=[]", "train.tensorboard=false",
            "train.device=cpu"]


def train_curve(recipe: str, overrides: list[str]) -> None:
    from smoltrain.config import load_config
    from smoltrain.train import trainer

    torch.set_num_threads(1)
    trainer.run(load_config(recipe, overrides))


def _curve_worker(rank: int, world: int, port: int, recipe: str, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    train_curve(recipe, overrides)


def _read_curve(out: Path) -> list[tuple[int, float, float]]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r and "event" not in r]


def curves(recipe: str, steps: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    _subprocess_curve(recipe, _curve_overrides(str(tmp / "single"), steps))
    mp.spawn(_curve_worker, args=(2, _port(), recipe, _curve_overrides(str(tmp / "fsdp2"), steps)), nprocs=2, join=True)
    fsdp, single = _read_curve(tmp / "fsdp2"), _read_curve(tmp / "single")
    print("FSDP2 2 vs 1 process: step, loss rel diff, grad norm rel diff")
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(fsdp, single):
        print(f"  {step:3d}  {abs(loss - ref_loss) / ref_loss:.1e}  {abs(norm - ref_norm) / ref_norm:.1e}")


def _subprocess_curve(recipe: str, overrides: list[str]) -> None:
    ctx = mp.get_context("spawn")
    process = ctx.Process(target=train_curve, args=(recipe, overrides))
    process.start()
    process.join()
    assert process.exitcode == 0


def main() -> None:
    recipe = sys.argv[1] if len(sys.argv) > 1 else "recipes/demo.yaml"
    if "--steps" in sys.argv:
        curves(recipe, int(sys.argv[sys.argv.index("--steps") + 1]))
        return
    tmp = Path(tempfile.mkdtemp())
    step_one(recipe, {}, str(tmp / "single.pt"))
    results = {"1 process": torch.load(tmp / "single.pt")}
    for name, parallel in (("DDP 2", {"ddp": "true"}), ("FSDP2 2", {})):
        mp.spawn(_worker, args=(2, _port(), recipe, parallel, str(tmp / "x.pt")), nprocs=2, join=True)
        results[name] = torch.load(tmp / "x.pt")
    ref = results["1 process"]
    for name, r in results.items():
        by_hand = math.sqrt(sum(float(g.double().pow(2).sum()) for g in r["grads"].values()))
        print(f"{name:>10}: loss {r['loss']:.9g} grad norm {r['norm']:.9g} (float64 over full grads {by_hand:.9g}) "
              f"rel vs 1 process {abs(r['norm'] - ref['norm']) / ref['norm']:.2e}")
        worst = sorted(((float((g - ref['grads'][k]).abs().max() / ref['grads'][k].abs().max().clamp(min=1e-30)), k)
                        for k, g in r["grads"].items()), reverse=True)[:3]
        print("            largest per-parameter max|diff|/max|g|: " + ", ".join(f"{k} {v:.1e}" for v, k in worst))


if __name__ == "__main__":
    main()
