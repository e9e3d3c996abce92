"""GRPO rollout throughput (sampled tokens/s) of our batched KV-cache sampler against transformers'
`generate` on the same model exported to Hugging Face format, the same left-padded prompts, batch
and sampling settings, in the same run. Prints one JSON line with the ratio.

    python bench/rollout.py                          # ~4M-parameter model, CPU, 8 prompts x G=8
    python bench/rollout.py --hidden 576 --layers 30 --vocab 49152 --device cuda   # SmolLM2-135M shape

Every row decodes exactly --new-tokens tokens (no end token), so both sides produce the same number
of tokens; weights are random: speed only (parity is tests/test_generate.py and test_grpo_rollout.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def timed_pair(a, b, repeats: int) -> list[tuple[float, float]]:
    """Best-of-n (wall, CPU) seconds of a and b, run alternately so both see the same machine load;
    with one thread, CPU seconds are what a shared, loaded machine does not inflate."""
    a(), b()  # warm-up: allocator, kernels
    best = [(float("inf"),) * 2, (float("inf"),) * 2]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            start = (time.perf_counter(), time.process_time())
            fn()
            took = (time.perf_counter() - start[0], time.process_time() - start[1])
            best[i] = tuple(min(x, y) for x, y in zip(best[i], took))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt (batch = prompts x G; TRL: 8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from smoltrain.config import ModelConfig
    from smoltrain.model.flops import parameter_counts
    from smoltrain.model.transformer import build_model
    from smoltrain.post.rl.rollout import generate_rollouts
    from smoltrain.report.hf_export import export_hf

    device = torch.device(args.device)
    heads = max(1, args.hidden // 64)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                         num_kv_heads=max(1, heads // 4), intermediate_size=int(args.hidden * 8 / 3) // 32 * 32,
                         max_seq_len=512, nope_every=4)
    model = build_model(config, seed=0, device=device).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(24, 72, (args.prompts,), generator=g).tolist()  # chat prompts of varied length
    prompts = [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]
    tokens = args.prompts * args.num_generations * args.new_tokens

    def ours():
        generate_rollouts(model, prompts, args.num_generations, args.new_tokens, args.temperature, args.top_k, args.top_p,
                          stop_tokens=(), generator=torch.Generator(device=device).manual_seed(1))

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    hf = hf.to(device).eval()
    repeated = [p for p in prompts for _ in range(args.num_generations)]
    longest = max(lengths)
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in repeated], device=device)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in repeated], device=device)

    def peer():
        torch.manual_seed(1)
        with torch.no_grad():
            hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, pad_token_id=0, eos_token_id=None)

    (ours_s, ours_cpu), (peer_s, peer_cpu) = timed_pair(ours, peer, args.repeats)
    print(json.dumps({
        "bench": "rollout", "date": time.strftime("%Y-%m-%d"), "device": str(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "params": parameter_counts(config)["total"], "batch": len(repeated), "mean_prompt_tokens": sum(lengths) / len(lengths),
        "new_tokens": args.new_tokens, "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
        "ours_tokens_per_s": round(tokens / ours_s, 1), "transformers_tokens_per_s": round(tokens / peer_s, 1),
        "speedup_vs_transformers": round(peer_s / ours_s, 2),
        "ours_cpu_tokens_per_s": round(tokens / ours_cpu, 1), "transformers_cpu_tokens_per_s": round(tokens / peer_cpu, 1),
        "cpu_speedup_vs_transformers": round(peer_cpu / ours_cpu, 2),
    }))


if __name__ == "__main__":
    main()
