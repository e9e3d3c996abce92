"""Memory and step time of a LoRA fine-tuning step (train.lora, through peft) next to full fine-tuning,
same shape, batch and starting weights; prints both and the ratios.

The step is the trainer's own (build_training_model, build_optimizer, forward_backward, optimizer.step)
on one micro-batch, the step SFT runs (its objective only masks labels). Step times alternate LoRA and
full in rounds in one process, so a noisy neighbour slows both alike; medians are reported. Memory
comes from one fresh process per variant: peak RSS over the build and 3 steps, above the process's
RSS before the model existed (peft imported in both), and the exact bytes of parameters, gradients and AdamW state.

    python bench/lora_step.py                         # CPU, 19M-parameter shape, r 16 on every projection
    python bench/lora_step.py --shape smollm2-135m --device cuda --batch 16 --seq 2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import resource
import statistics

import torch
from train_step import SHAPES, bench_config, timed

from smoltrain.config import LoRAConfig
from smoltrain.train.distributed import single_process_context
from smoltrain.train.optim import build_optimizer
from smoltrain.train.pretrain import PretrainObjective
from smoltrain.train.trainer import build_training_model, forward_backward


def variant_config(args, device: torch.device, lora: bool):
    config = bench_config(args, device)
    config.train.lora = LoRAConfig(r=args.r, alpha=2.0 * args.r) if lora else None
    return config


def make_batch(config, args) -> dict:
    ids = torch.randint(0, config.model.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "document_ids": torch.zeros(args.batch, args.seq, dtype=torch.int32)}


def build_step(config, device: torch.device, batch: dict):
    model = build_training_model(config, device)
    optimizer = build_optimizer(config.optim, model)
    objective, ctx = PretrainObjective(config, batches=None), single_process_context(device, config.train)

    def step():
        forward_backward(model, objective, [batch], ctx, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: their bytes are counted

    return model, optimizer, step


def state_bytes(model, optimizer) -> dict:
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.ndim > 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "parameter_bytes": parameters, "gradient_bytes": gradients,
            "optimizer_bytes": moments, "total_bytes": parameters + gradients + moments}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def memory_of(args, lora: bool, queue) -> None:
    """In a fresh process: peak RSS of building the variant and 3 steps, and its state bytes."""
    device = torch.device(args.device)
    config = variant_config(args, device, lora)
    batch = make_batch(config, args)
    import peft  # noqa: F401  # both variants: its import (~40 MB) is not the adapters' memory

    before = _rss_kb()
    model, optimizer, step = build_step(config, device, batch)
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    record = {**state_bytes(model, optimizer), "peak_rss_above_start_bytes": (peak - before) * 1024}
    if device.type == "cuda":
        record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    queue.put(record)


def measure_memory(args) -> dict:
    context = mp.get_context("spawn")
    result = {}
    for name, lora in (("full", False), ("lora", True)):
        queue = context.Queue()
        process = context.Process(target=memory_of, args=(args, lora, queue))
        process.start()
        result[name] = queue.get()
        process.join()
    return result


def measure_time(args) -> dict:
    device = torch.device(args.device)
    steps = {}
    for name, lora in (("full", False), ("lora", True)):
        config = variant_config(args, device, lora)
        steps[name] = build_step(config, device, make_batch(config, args))[2]
    for step in steps.values():
        timed(step, device, args.warmup)
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step, device, 1))
    return {name: {"step_s": statistics.median(w for w, _ in s), "step_cpu_s": statistics.median(c for _, c in s)}
            for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="19m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha 2r, every projection)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    args.compile, args.precision = "off", "bf16" if args.device == "cuda" else "fp32"
    args.activation_checkpointing, args.activation_checkpointing_every = False, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    memory, timing = measure_memory(args), measure_time(args)
    full, lora = {**memory["full"], **timing["full"]}, {**memory["lora"], **timing["lora"]}
    print(f"{args.shape}, batch {args.batch} x seq {args.seq}, {args.device} {args.precision}, LoRA r {args.r} on every projection")
    print(f"{'':28} {'full':>12} {'LoRA':>12} {'LoRA / full':>12}")
    rows = [("trainable parameters", "trainable_parameters", 1), ("parameters (MB)", "parameter_bytes", 1e6),
            ("gradients (MB)", "gradient_bytes", 1e6), ("AdamW state (MB)", "optimizer_bytes", 1e6),
            ("params + grads + Adam (MB)", "total_bytes", 1e6), ("peak RSS above start (MB)", "peak_rss_above_start_bytes", 1e6),
            ("step (s, median wall)", "step_s", 1), ("step (s, median CPU)", "step_cpu_s", 1)]
    if "peak_cuda_bytes" in full:
        rows.append(("peak CUDA memory (MB)", "peak_cuda_bytes", 1e6))
    for label, key, unit in rows:
        print(f"{label:28} {full[key] / unit:12.4g} {lora[key] / unit:12.4g} {lora[key] / full[key]:12.3f}")
    if args.json:
        record = {"full": full, "lora": lora, "args": vars(args), "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "date": datetime.date.today().isoformat()}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
