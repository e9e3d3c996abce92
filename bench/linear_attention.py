"""Our chunked gated delta rule against transformers' torch fallback (torch_chunk_gated_delta_rule,
what Qwen3-Next runs without flash-linear-attention), same shapes and inputs, in one process:
forward, and forward + backward; prints tokens/s of each and the ratio (median of alternating
rounds, so a noisy neighbour slows both alike). Checks the outputs agree before timing.

    python bench/linear_attention.py                      # CPU fp32: 1 x 2048 tokens, 8 heads of 64 (Qwen3-Next-like)
    python bench/linear_attention.py --threads 1 --seq 1024 --our-chunk 64   # both at chunk 64
    python bench/linear_attention.py --flush-denormal --json out.json      # subnormals flushed, both
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

from smoltrain.model.delta_rule import chunk_gated_delta_rule


def _inputs(batch: int, seq: int, heads: int, dim: int, device: str, grad: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=g).to(device).requires_grad_(grad) for _ in range(3))
    decay = (-2 * torch.rand(batch, seq, heads, generator=g)).to(device)
    beta = torch.rand(batch, seq, heads, generator=g).to(device)
    return q, k, v, decay, beta


def _theirs(q, k, v, decay, beta, chunk):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    return torch_chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=chunk, use_qk_l2norm_in_kernel=True)[0]


def _ours(q, k, v, decay, beta, chunk):
    return chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=chunk)[0]  # ours at its default: chunk 32


def _timed(fn, inputs, backward: bool, device: str) -> tuple[float, float]:
    """(wall-clock, CPU) seconds: on a shared machine the process's CPU time is the steadier of the two."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*inputs)
    if backward:
        out.square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def compare(batch: int, seq: int, heads: int, dim: int, chunks: tuple[int, int], rounds: int, backward: bool,
            device: str) -> dict:
    """chunks: (ours, transformers')."""
    inputs = _inputs(batch, seq, heads, dim, device, backward)
    with torch.no_grad():
        diff = (_ours(*inputs, chunks[0]) - _theirs(*inputs, chunks[1])).abs().max().item()
    fns = {"ours": lambda *x: _ours(*x, chunks[0]), "transformers": lambda *x: _theirs(*x, chunks[1])}
    for fn in fns.values():  # warm up
        _timed(fn, inputs, backward, device)
    times = {name: [] for name in fns}
    for _ in range(rounds):  # alternate, so a neighbour's load falls on both
        for name, fn in fns.items():
            times[name].append(_timed(fn, inputs, backward, device))
    wall = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
    tokens = batch * seq
    return {"device": device, "pass": "forward+backward" if backward else "forward", "batch": batch, "seq": seq,
            "heads": heads, "head_dim": dim, "chunk_ours": chunks[0], "chunk_transformers": chunks[1], "max_abs_diff": diff,
            "tokens_per_s_ours": tokens / wall["ours"], "tokens_per_s_transformers": tokens / wall["transformers"],
            "ratio": wall["transformers"] / wall["ours"], "tokens_per_cpu_s_ours": tokens / cpu["ours"],
            "tokens_per_cpu_s_transformers": tokens / cpu["transformers"], "ratio_cpu": cpu["transformers"] / cpu["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="transformers' chunk (its default: 64)")
    parser.add_argument("--our-chunk", type=int, default=32, help="ours (its default: 32, see delta_rule.py)")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) for both: subnormal floats as zero (x86 FTZ/DAZ)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    import transformers

    header = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "transformers": transformers.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0],
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "flush_denormal": args.flush_denormal}
    print(json.dumps(header))
    results = []
    for backward in (False, True):
        r = compare(args.batch, args.seq, args.heads, args.head_dim, (args.our_chunk, args.chunk), args.rounds, backward,
                    args.device)
        results.append(r)
        print(f"{r['device']} {r['pass']:16} {args.batch}x{args.seq}, {args.heads} heads x {args.head_dim}, "
              f"chunk {args.our_chunk} vs {args.chunk}: "
              f"ours {r['tokens_per_s_ours']:,.0f} tok/s, transformers {r['tokens_per_s_transformers']:,.0f} tok/s, "
              f"ratio {r['ratio']:.2f}x; per CPU-second {r['tokens_per_cpu_s_ours']:,.0f} vs {r['tokens_per_cpu_s_transformers']:,.0f}, "
              f"ratio {r['ratio_cpu']:.2f}x (max |diff| {r['max_abs_diff']:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
