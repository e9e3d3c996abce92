"""Retrieval by length on a real model (docs/LOG): passkey and single needle at several lengths, a few
seeded items each, through smoltrain's long-context eval. CPU-heavy: run with nice and few items.

    python bench/longctx_retrieval.py MODEL_FOLDER --tasks passkey niah_single_1 --lengths 1024 2048 --items 2
"""

import argparse
import json
import time

import torch

from smoltrain.config import RopeScaling
from smoltrain.eval.longctx import long_context_task, score_long_context
from smoltrain.eval.scoring import end_of_text_id, load_tokenizer
from smoltrain.train.load_model import load_any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "niah_single_1"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 12288])
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=None, help="generation budget (default RULER's)")
    parser.add_argument("--yarn", type=float, default=None, help="YaRN factor over the trained length (no training)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append one JSON line per task and length")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _, tokenizer_path = load_any(args.model)
    tokenizer = load_tokenizer(tokenizer_path)
    if args.yarn:
        model.set_rope(scaling=RopeScaling(factor=args.yarn, original_max_seq_len=model.config.max_seq_len))
    print(f"{args.model}: trained at {model.config.max_seq_len} tokens, torch {torch.__version__}, {args.threads} thread(s)")
    for length in args.lengths:
        for name in args.tasks:
            started = time.perf_counter()
            task = long_context_task(f"{name}@{length}", args.items, answer_tokens=args.answer_tokens)
            result = score_long_context(model, tokenizer, task, stop_token_ids=[end_of_text_id(tokenizer)])
            row = {"task": name, "length": length, "yarn": args.yarn, "score": result["ruler_match"], "n": result["n"],
                   "by_depth": result["by_depth"], "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
