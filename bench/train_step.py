"""Tokens/s of `smoltrain train`'s step next to transformers' LlamaForCausalLM + torch AdamW, same
shape, batch, weights and precision, in one process; prints both and the ratio.

Our step is the trainer's own: build_training_model (per-block compile where the config says),
build_optimizer (parameter groups, fused AdamW on CUDA), forward_backward (the pretraining
objective's summed loss, accumulation, normalisation by the step's label tokens, clipping, the
non-finite check's sync) and optimizer.step. The peer does what a transformers user writes:
forward with labels, backward, clip, AdamW (fused on CUDA), and `model.compile()` with
--peer-compile. The two alternate in rounds so a noisy neighbour slows both alike; medians are
reported. Plain causal attention on both sides (one document per sequence).

    python bench/train_step.py                                   # CPU, 19M-parameter shape, fp32
    python bench/train_step.py --shape smollm2-135m --device cuda --peer-compile
    python bench/train_step.py --shape smollm3-3b --device cuda --batch 2 --seq 4096 --activation-checkpointing --sequential
    python bench/train_step.py --shape demo --batch 8 --compile on --precision bf16   # CPU, the demo's shape
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import time

import torch

from smoltrain.config import config_from_dict
from smoltrain.model.flops import flops_per_token, parameter_counts
from smoltrain.train.distributed import single_process_context
from smoltrain.train.metrics import mfu, peak_tflops
from smoltrain.train.optim import build_optimizer
from smoltrain.train.pretrain import PretrainObjective
from smoltrain.train.trainer import build_training_model, forward_backward

SHAPES = {
    "demo": dict(vocab_size=4096, hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=384,
                 nope_every=4),
    # SmolLM2-135M's proportions at 19M parameters: what 2 CPU cores can time in a minute.
    "19m": dict(vocab_size=16384, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=1024),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5, intermediate_size=2560),
    "smollm3-3b": dict(vocab_size=128256, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=4,
                       intermediate_size=11008, nope_every=4, rope_theta=50000.0),
}


def bench_config(args, device: torch.device):
    return config_from_dict({
        "model": {**SHAPES[args.shape], "max_seq_len": args.seq, "document_masking": False},
        "data": {"seq_len": args.seq},
        "optim": {"lr": 3e-4, "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"micro_batch_size": args.batch, "global_batch_tokens": args.batch * args.seq,
                  "device": device.type, "precision": args.precision,
                  "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
                  "activation_checkpointing_every": args.activation_checkpointing_every},
    })


def our_step(config, device, batch):
    model = build_training_model(config, device)
    optimizer = build_optimizer(config.optim, model)
    objective, ctx = PretrainObjective(config, batches=None), single_process_context(device, config.train)

    def step():
        forward_backward(model, objective, [batch], ctx, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def peer_step(config, device, batch, ours_state, compile_model: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from smoltrain.model.hf import to_hf_config, to_hf_names

    hf_config = to_hf_config(config.model)
    hf_config.pop("dtype", None)
    hf_config = AutoConfig.for_model(**hf_config)
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config).to(device)
    if ours_state is not None:  # the same weights: the first losses must agree
        model.load_state_dict({k: v.to(device) for k, v in to_hf_names(ours_state).items()}, strict=False)
    if config.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if compile_model:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.train.precision == "bf16"
                else contextlib.nullcontext())
    inputs = {k: v.to(device) for k, v in batch.items()}

    def step():
        with autocast:
            # shift_labels: transformers scores our already-shifted labels as they are (same tokens).
            loss = model(input_ids=inputs["input_ids"], labels=inputs["labels"], shift_labels=inputs["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads its loss every step too

    return model, step


def timed(step, device, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds for `steps` steps, synchronised. On a shared CPU box the wall
    clock also measures the neighbours; the CPU time of a 1-thread run does not."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config = bench_config(args, device)
    torch.manual_seed(0)
    ids = torch.randint(0, config.model.vocab_size, (args.batch, args.seq + 1))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "document_ids": torch.zeros(args.batch, args.seq, dtype=torch.int32)}
    rates, cpu_rates, profile = measure_both(args, config, device, batch)
    result = result_record(args, config, device, rates, cpu_rates)
    print_result(args, config, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if profile:
        print(profile)


def parse_args() -> argparse.Namespace:
    """The command line, with the device-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="19m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="micro-batch (default 4 on CPU, 16 on CUDA)")
    parser.add_argument("--seq", type=int, help="sequence length (default 256 on CPU, 2048 on CUDA)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="our train.compile (auto: per-block compile on CUDA)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="both sides (default bf16 autocast on CUDA, fp32 on CPU)")
    parser.add_argument("--peer-compile", action="store_true", help="transformers model.compile()")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both sides")
    parser.add_argument("--activation-checkpointing-every", type=int, default=1, metavar="N",
                        help="ours recomputes only every Nth block (transformers checkpoints all of them)")
    parser.add_argument("--sequential", action="store_true",
                        help="time ours, free it, then the peer (models too big to hold both)")
    parser.add_argument("--skip-peer", action="store_true", help="time ours only")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile this many of our steps and print the top operators by self time")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.batch = args.batch or (16 if cuda else 4)
    args.seq = args.seq or (2048 if cuda else 256)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    return args


def measure_both(args, config, device, batch) -> tuple[dict, dict, str | None]:
    """Tokens per wall second and per CPU second of ours and the peer (alternating in rounds, or one
    after the other with --sequential), and our profile table with --profile."""
    tokens = args.batch * args.seq
    cpu_rates = {}

    def measure(steps: dict) -> dict:
        for step in steps.values():
            timed(step, device, args.warmup)  # compile, allocator and cache warm-up
        seconds = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                seconds[name].append(timed(step, device, args.steps_per_round))
        done = tokens * args.steps_per_round
        cpu_rates.update({name: done / statistics.median(c for _, c in s) for name, s in seconds.items()})
        return {name: done / statistics.median(w for w, _ in s) for name, s in seconds.items()}

    ours_model, ours = our_step(config, device, batch)
    profile = profile_table(ours, device, args.warmup, args.profile) if args.profile else None
    state = {k: v.detach().cpu() for k, v in ours_model.state_dict().items()}
    if args.skip_peer:
        rates = measure({"smoltrain": ours})
    elif args.sequential:
        rates = measure({"smoltrain": ours})
        del ours_model, ours
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _, peer = peer_step(config, device, batch, state, args.peer_compile)
        rates.update(measure({"transformers": peer}))
    else:
        _, peer = peer_step(config, device, batch, state, args.peer_compile)
        rates = measure({"smoltrain": ours, "transformers": peer})
    return rates, cpu_rates, profile


def result_record(args, config, device, rates: dict, cpu_rates: dict) -> dict:
    """The JSON record: hardware, versions and date next to the numbers."""
    import transformers

    per_token = flops_per_token(config.model, args.seq)
    peak = peak_tflops(device)
    result = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "transformers": transformers.__version__, "shape": args.shape,
        "parameters": parameter_counts(config.model)["total"], "batch": args.batch, "seq": args.seq,
        "precision": config.train.precision, "compile": config.train.compile, "peer_compile": args.peer_compile,
        "activation_checkpointing": args.activation_checkpointing,
        "activation_checkpointing_every": args.activation_checkpointing_every,
        "tokens_per_s": rates, "mfu": {k: mfu(v, per_token, peak) for k, v in rates.items()},
        "ratio": rates["smoltrain"] / rates["transformers"] if "transformers" in rates else None,
    }
    if device.type == "cpu":
        result["tokens_per_cpu_s"] = cpu_rates
        result["ratio_cpu_time"] = cpu_rates["smoltrain"] / cpu_rates["transformers"] if "transformers" in cpu_rates else None
    return result


def print_result(args, config, result: dict) -> None:
    """The record as JSON, then one line a person reads (and the per-CPU-second ratio on a CPU)."""
    print(json.dumps(result))
    rates = result["tokens_per_s"]
    line = " | ".join(f"{name} {rate:,.0f} tok/s" + (f" ({100 * result['mfu'][name]:.0f}% MFU)" if result["mfu"][name] else "")
                      for name, rate in rates.items())
    ratio = f" | ratio {result['ratio']:.2f}x" if result["ratio"] else ""
    print(f"{result['device']} {args.shape} {args.batch}x{args.seq} {config.train.precision}: {line}{ratio}")
    if result.get("ratio_cpu_time"):
        print("per CPU-second: " + " | ".join(f"{n} {r:,.0f} tok/s" for n, r in result["tokens_per_cpu_s"].items())
              + f" | ratio {result['ratio_cpu_time']:.2f}x")


def profile_table(step, device, warmup: int, steps: int) -> str:
    """Where our step's time goes: operators by self time (CUDA kernels' on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    timed(step, device, warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed(step, device, steps)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)


if __name__ == "__main__":
    main()
