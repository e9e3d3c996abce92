"""One MoE training step (forward + backward + AdamW, loss = CE + coef x aux) of our model against
transformers' Qwen3MoeForCausalLM, same shape, same weights, same batch, in one process; prints
tokens/s and tokens per CPU-second and the ratios (median of alternating rounds, so a noisy neighbour
slows both alike), then the same for one MoE block alone (forward + backward), where the two differ.

transformers runs its default experts implementation (`grouped_mm` in 5.x) or with --eager its loop
over experts that gathers each one's tokens with a mask; ours sorts tokens by expert once and runs one
grouped GEMM. Both step with fused AdamW, as both trainers do by default (ours: train/optim.py;
transformers' TrainingArguments: adamw_torch_fused on torch >= 2.8).

    python bench/moe_step.py                 # CPU fp32 (+ CUDA bf16 if present)
    python bench/moe_step.py --threads 1 --eager --json out.json
    python bench/moe_step.py --threads 1 --eager --precision bf16     # CPU bf16 autocast, both
    python bench/moe_step.py --threads 1 --eager --shape olmoe        # OLMoE's 64 experts top-8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
from model_step import make_step, time_pair

from smoltrain.config import ModelConfig
from smoltrain.model.flops import parameter_counts
from smoltrain.model.hf import to_hf_config, to_hf_names
from smoltrain.model.transformer import build_model

# Two MoEs in miniature, both run as Qwen3MoeForCausalLM on transformers' side. "small": 16 experts
# top-2 (sparsity 8), granularity 2 x 256 / 128 = 4; the vocabulary head is ~half the step's FLOPs.
# "olmoe": OLMoE-1B-7B's routing (64 experts, top-8, expert width = hidden / 2) at width 256, where
# the MoE blocks are most of the step, as in the real model (there the head is ~4% of active FLOPs).
_COMMON = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
               qk_norm=True, norm_topk_prob=True, aux_loss_coef=0.01)
SHAPES = {"small": dict(_COMMON, num_experts=16, experts_per_token=2, expert_hidden=128),
          "olmoe": dict(_COMMON, num_experts=64, experts_per_token=8, expert_hidden=128, norm_topk_prob=False)}


def build_pair(model_config: ModelConfig, device: str, experts: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    ours = build_model(model_config, seed=0, device=device)
    hf_config = to_hf_config(model_config)
    hf_config.pop("dtype", None)
    hf_config = AutoConfig.for_model(**hf_config)
    hf_config._attn_implementation = "sdpa"
    theirs = AutoModelForCausalLM.from_config(hf_config).to(device)
    # transformers' in-memory experts are fused; load through its own on-disk -> memory conversion.
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        hf_config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in to_hf_names(ours.state_dict()).items()}, f"{tmp}/model.safetensors")
        kwargs = {"experts_implementation": experts} if experts else {}
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kwargs).to(device)
    assert type(theirs).__name__ == "Qwen3MoeForCausalLM"
    return ours, theirs.train()


def loss_ours(model, input_ids, labels):
    return model(input_ids, labels=labels).loss


def loss_theirs(model, input_ids, labels):
    return model(input_ids=input_ids, labels=labels, shift_labels=labels, output_router_logits=True).loss


def run_case(model_config, device, batch_size, seq_len, rounds, steps_per_round, warmup, experts, cpu_precision) -> dict:
    torch.manual_seed(0)
    ours, theirs = build_pair(model_config, device, experts)
    tokens = torch.randint(0, model_config.vocab_size, (batch_size, seq_len + 1), device=device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    with torch.no_grad():
        start_ours, start_theirs = loss_ours(ours, *batch).item(), loss_theirs(theirs, *batch).item()
    precision = "bf16" if device == "cuda" else cpu_precision
    steps = {"ours": make_step(ours, loss_ours, batch, device, precision, fused=True),
             "transformers": make_step(theirs, loss_theirs, batch, device, precision, fused=True)}
    rates = time_pair(steps, device, batch_size * seq_len, rounds, steps_per_round, warmup)
    (ours_wall, ours_cpu), (theirs_wall, theirs_cpu) = rates["ours"], rates["transformers"]
    return {"device": device, "precision": precision, "batch": batch_size, "seq_len": seq_len,
            "transformers_experts": theirs.config._experts_implementation,
            "tokens_per_s_ours": ours_wall, "tokens_per_s_transformers": theirs_wall, "ratio": ours_wall / theirs_wall,
            "tokens_per_cpu_s_ours": ours_cpu, "tokens_per_cpu_s_transformers": theirs_cpu,
            "ratio_cpu_time": ours_cpu / theirs_cpu, "initial_loss_ours": start_ours, "initial_loss_transformers": start_theirs,
            **block_ratios(ours, theirs, batch_size, seq_len, device, precision, rounds)}


def block_ratios(ours, theirs, batch_size: int, seq_len: int, device: str, precision: str, rounds: int) -> dict:
    """One MoE block (router, experts, combine) forward + backward on the same hidden states: median
    seconds and CPU-seconds of alternating runs, as ratios transformers / ours."""
    hidden = torch.randn(batch_size, seq_len, ours.config.hidden_size, device=device, requires_grad=True)
    blocks = {"ours": ours.layers[0].mlp, "transformers": theirs.model.layers[0].mlp}

    def run(block):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = block(hidden)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()

    times = {name: [] for name in blocks}
    for index in range(rounds * 4 + 2):
        for name, block in blocks.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(block)
            if device == "cuda":
                torch.cuda.synchronize()
            if index >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
    wall, cpu = ({name: statistics.median(t[i] for t in runs) for name, runs in times.items()} for i in (0, 1))
    return {"block_ratio": wall["transformers"] / wall["ours"], "block_ratio_cpu_time": cpu["transformers"] / cpu["ours"],
            "block_ms_cpu_ours": 1e3 * cpu["ours"], "block_ms_cpu_transformers": 1e3 * cpu["transformers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cpu-seq", type=int, default=256)
    parser.add_argument("--cuda-batch", type=int, default=16)
    parser.add_argument("--cuda-seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--eager", action="store_true", help="transformers' eager experts (a masked loop) instead of its default")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="CPU: fp32, or bf16 autocast for both")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="small (16 experts top-2) or olmoe (64 top-8)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    model_config = ModelConfig(**SHAPES[args.shape], max_seq_len=max(args.cpu_seq, args.cuda_seq))
    counts = parameter_counts(model_config)
    cases = [("cpu", args.cpu_batch, args.cpu_seq)] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        cases.append(("cuda", args.cuda_batch, args.cuda_seq))
    header = {"date": datetime.date.today().isoformat(), "shape": args.shape, "parameters": counts["total"], "active": counts["active"],
              "torch": torch.__version__, "transformers": transformers.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0],
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(json.dumps(header))
    results = []
    for device, batch_size, seq_len in cases:
        r = run_case(model_config, device, batch_size, seq_len, args.rounds, args.steps_per_round, args.warmup,
                     "eager" if args.eager else None, args.precision)
        results.append(r)
        print(f"{device:4} {r['precision']} batch {batch_size}x{seq_len}, transformers experts {r['transformers_experts']}: "
              f"ours {r['tokens_per_s_ours']:,.0f} tok/s, "
              f"transformers {r['tokens_per_s_transformers']:,.0f} tok/s, ratio {r['ratio']:.2f}x "
              f"(per CPU-second {r['tokens_per_cpu_s_ours']:,.0f} vs {r['tokens_per_cpu_s_transformers']:,.0f}, "
              f"{r['ratio_cpu_time']:.2f}x; initial loss {r['initial_loss_ours']:.4f} "
              f"vs {r['initial_loss_transformers']:.4f}); one MoE block fwd+bwd {r['block_ratio']:.2f}x "
              f"(per CPU-second {r['block_ratio_cpu_time']:.2f}x: {r['block_ms_cpu_ours']:.1f} vs {r['block_ms_cpu_transformers']:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
