"""One training step (forward + backward + AdamW) of our model against transformers' LlamaForCausalLM,
same shape, same weights, same batch, same optimizer, in one process; prints tokens/s and the ratio.

The two models alternate in rounds, so a noisy neighbour on a shared machine slows both alike; the
median round is reported. CPU always (fp32); CUDA when present (bf16 autocast over fp32 weights,
fused AdamW), with and without per-block torch.compile.

    python bench/model_step.py                       # default: 19M-parameter shape, CPU (+ CUDA if any)
    python bench/model_step.py --json out.json --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time

import torch

from smoltrain.config import ModelConfig
from smoltrain.model.flops import parameter_counts
from smoltrain.model.hf import to_hf_config, to_hf_names
from smoltrain.model.transformer import build_model

# SmolLM2-135M's proportions shrunk to ~19M parameters (GQA 6/2, tied): small enough for 2 CPU cores.
SHAPES = {
    "19m": dict(vocab_size=16384, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=1024),
    "45m": dict(vocab_size=32768, hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=4, intermediate_size=1536),
    "135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536),
}


def build_pair(model_config: ModelConfig, device: str):
    """Our model and a LlamaForCausalLM holding the very same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ours = build_model(model_config, seed=0, device=device)
    hf_config = to_hf_config(model_config)
    hf_config.pop("dtype", None)
    hf_config = AutoConfig.for_model(**hf_config)
    hf_config._attn_implementation = "sdpa"
    theirs = AutoModelForCausalLM.from_config(hf_config).to(device)
    state = {k: v.to(device) for k, v in to_hf_names(ours.state_dict()).items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    return ours, theirs


def loss_ours(model, input_ids, labels):
    return model(input_ids, labels=labels).loss


def loss_theirs(model, input_ids, labels):
    # shift_labels: transformers' loss takes our already-shifted labels as they are (same tokens scored).
    return model(input_ids=input_ids, labels=labels, shift_labels=labels).loss


def make_step(model, loss_fn, batch, device: str, precision: str, fused: bool | None = None):
    """fused: AdamW's fused kernel (default: on CUDA only); precision "bf16" is autocast on either device."""
    fused = device == "cuda" if fused is None else fused
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step():
        with autocast():
            loss = loss_fn(model, *batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def compile_blocks(model) -> None:
    """Per-block compile, as the trainer applies it (one graph per decoder layer, reused)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers  # transformers nests a .model
    for layer in layers:
        layer.compile()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(steps: dict, device: str, tokens: int, rounds: int, steps_per_round: int, warmup: int) -> dict:
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                step()
            synchronize(device)
            wall[name].append(tokens * steps_per_round / (time.perf_counter() - start))
            cpu[name].append(tokens * steps_per_round / (time.process_time() - start_cpu))
    # Per CPU-second as well: on a shared CPU box the wall clock also measures the neighbours.
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def run_case(model_config, device, precision, compiled, batch_size, seq_len, rounds, steps_per_round, warmup) -> dict:
    torch.manual_seed(0)
    ours, theirs = build_pair(model_config, device)
    tokens = torch.randint(0, model_config.vocab_size, (batch_size, seq_len + 1), device=device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    with torch.no_grad():  # same weights, same batch: the same loss before any step
        start_ours, start_theirs = loss_ours(ours, *batch).item(), loss_theirs(theirs, *batch).item()
    if compiled:
        compile_blocks(ours)
        compile_blocks(theirs)
    steps = {
        "ours": make_step(ours, loss_ours, batch, device, precision),
        "transformers": make_step(theirs, loss_theirs, batch, device, precision),
    }
    rates = time_pair(steps, device, batch_size * seq_len, rounds, steps_per_round, warmup)
    (ours_wall, ours_cpu), (theirs_wall, theirs_cpu) = rates["ours"], rates["transformers"]
    return {
        "device": device, "precision": precision, "compile": compiled, "batch": batch_size, "seq_len": seq_len,
        "tokens_per_s_ours": ours_wall, "tokens_per_s_transformers": theirs_wall, "ratio": ours_wall / theirs_wall,
        "tokens_per_cpu_s_ours": ours_cpu, "tokens_per_cpu_s_transformers": theirs_cpu, "ratio_cpu_time": ours_cpu / theirs_cpu,
        "initial_loss_ours": start_ours, "initial_loss_transformers": start_theirs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="19m")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, then CUDA if present")
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cpu-seq", type=int, default=256)
    parser.add_argument("--cuda-batch", type=int, default=16)
    parser.add_argument("--cuda-seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    model_config = ModelConfig(**SHAPES[args.shape], max_seq_len=max(args.cpu_seq, args.cuda_seq))
    counts = parameter_counts(model_config)
    cases = []
    if args.device in ("auto", "cpu"):
        cases.append(("cpu", "fp32", False, args.cpu_batch, args.cpu_seq))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        cases += [("cuda", "bf16", False, args.cuda_batch, args.cuda_seq), ("cuda", "bf16", True, args.cuda_batch, args.cuda_seq)]

    header = {
        "date": datetime.date.today().isoformat(), "shape": args.shape, "parameters": counts["total"],
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(json.dumps(header))
    results = []
    for device, precision, compiled, batch_size, seq_len in cases:
        result = run_case(model_config, device, precision, compiled, batch_size, seq_len, args.rounds, args.steps_per_round, args.warmup)
        results.append(result)
        print(
            f"{device:4} {precision} compile={'on ' if compiled else 'off'} batch {batch_size}x{seq_len}: "
            f"ours {result['tokens_per_s_ours']:,.0f} tok/s, transformers {result['tokens_per_s_transformers']:,.0f} tok/s, "
            f"ratio {result['ratio']:.2f}x (initial loss {result['initial_loss_ours']:.4f} vs {result['initial_loss_transformers']:.4f})"
        )
        if device == "cpu":
            print(f"     per CPU-second: ours {result['tokens_per_cpu_s_ours']:,.0f}, transformers "
                  f"{result['tokens_per_cpu_s_transformers']:,.0f}, ratio {result['ratio_cpu_time']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
