"""Log-likelihood scoring throughput (multiple-choice items/s) of `smoltrain eval`, as one JSON line,
next to two peers on the same requests in the same run: our model one request per forward (what a
plain loop does), and transformers' LlamaForCausalLM with our batching (lighteval's backend).

    python bench/eval_throughput.py                      # ~10M-parameter model, CPU, embedded MC tasks
    python bench/eval_throughput.py --items 100 --batch-size 32 --device cuda

Items are the embedded suite's multiple-choice tasks (4 choices each); the tokenizer is a 4096-token
byte-level BPE trained on the corpus' prose (or --tokenizer). Weights are random: speed only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def build_requests(tokenizer, items_per_task: int):
    from smoltrain.eval.scoring import encode_pair
    from smoltrain.eval.suite import embedded_task
    from smoltrain.eval.tasks import build_prompt

    requests, items = [], 0
    for name in ("arithmetic_choice", "code_tokens", "prose_cloze"):
        task = embedded_task(name, 0, items_per_task)
        for index in range(len(task.items)):
            context, item = build_prompt(task, index)
            requests += [encode_pair(tokenizer, context, choice) for choice in item["choices"]]
            items += 1
    return requests, items


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=64, help="items per task (3 tasks, 4 choices each)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder (default: train a 4096 BPE on the corpus prose)")
    p.add_argument("--skip-peers", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from smoltrain.config import ModelConfig
    from smoltrain.eval.scoring import load_tokenizer, loglikelihoods
    from smoltrain.model.flops import parameter_counts
    from smoltrain.model.transformer import build_model

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        from smoltrain.data.tokenizer import train_tokenizer
        from smoltrain.eval.suite import prose_source

        tokenizer = train_tokenizer(list(prose_source()), 4096, show_progress=False)
    config = ModelConfig(vocab_size=4096, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                         num_kv_heads=max(1, args.hidden // 256), intermediate_size=int(args.hidden * 8 / 3) // 32 * 32,
                         max_seq_len=512)
    device = torch.device(args.device)
    model = build_model(config, seed=0, device=device).eval()
    requests, items = build_requests(tokenizer, args.items)
    tokens = sum(len(c) + len(a) for c, a in requests)

    result = {
        "bench": "eval_throughput", "date": time.strftime("%Y-%m-%d"), "device": str(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "params": parameter_counts(config)["total"], "items": items,
        "requests": len(requests), "mean_request_tokens": round(tokens / len(requests), 1), "batch_size": args.batch_size,
    }
    ours = timed(lambda: loglikelihoods(model, requests, batch_size=args.batch_size, device=device), args.repeats)
    result["items_per_s"] = round(items / ours, 1)
    if not args.skip_peers:
        single = timed(lambda: loglikelihoods(model, requests, batch_size=1, device=device), 1)
        result["unbatched_items_per_s"] = round(items / single, 1)
        result["speedup_vs_unbatched"] = round(single / ours, 2)

        import transformers

        from smoltrain.model.hf import to_hf_config

        # Same shape, its own random weights: only the speed is compared (parity is a test).
        hf_config = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(config).items() if k != "architectures"})
        hf = transformers.LlamaForCausalLM(hf_config).to(device).eval()

        class Logits(torch.nn.Module):  # our scoring loop over transformers' forward
            def __init__(self):
                super().__init__()
                self.hf, self.config = hf, config

            def forward(self, input_ids):
                return self.hf(input_ids).logits

        peer = timed(lambda: loglikelihoods(Logits(), requests, batch_size=args.batch_size, device=device), args.repeats)
        result["transformers_items_per_s"] = round(items / peer, 1)
        result["speedup_vs_transformers"] = round(peer / ours, 2)
        result["transformers"] = transformers.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
