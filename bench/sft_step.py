"""SFT tokens/s of `smoltrain sft` next to TRL's SFTTrainer (transformers model, its best-fit packing,
assistant-only loss), same conversations, template, shape, rows per step; one process each, same run.

Both train from scratch at the demo's shape on the embedded chat data for --warmup + --steps steps;
the time of the last --steps steps is measured per step on each side (our metrics.jsonl, TRL's step
callback). Tokens are real tokens (padding excluded): rows per step x seq x the packing efficiency
each side reports for its own packed rows.

    python bench/sft_step.py                      # CPU, demo shape, seq 512, 16 rows per step
    python bench/sft_step.py --conversations 2000 --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPE = {"vocab_size": 4096, "hidden_size": 128, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 384, "nope_every": 4}


def prepare(root: Path, args) -> tuple[Path, list]:
    from smoltrain.config import DataConfig
    from smoltrain.data.embedded import ensure_embedded_data
    from smoltrain.post.chat.data import read_conversations, write_conversations
    from smoltrain.post.chat.template import write_chat_tokenizer
    from smoltrain.post.embedded import ensure_embedded_chat

    data = ensure_embedded_data(DataConfig(embedded=True, embedded_vocab_size=SHAPE["vocab_size"]))
    write_chat_tokenizer(data.tokenizer, root / "tokenizer", "smollm3")
    conversations = read_conversations(ensure_embedded_chat(".cache/smoltrain", 0, 8000)).conversations
    conversations = conversations[:: max(1, len(conversations) // args.conversations)][: args.conversations]
    write_conversations(root / "chat.jsonl", conversations)
    return root / "tokenizer", conversations


def ours(root: Path, tokenizer: Path, args) -> dict:
    from smoltrain.config import config_from_dict
    from smoltrain.post.sft.stage import sft

    steps = args.warmup + args.steps
    config = config_from_dict({
        "model": {**SHAPE, "max_seq_len": args.seq},
        "data": {"seq_len": args.seq, "tokenizer": str(tokenizer / "tokenizer.json")},
        "sft": {"data": [str(root / "chat.jsonl")], "epochs": None, "warmup_fraction": None, "chat_eval_items": 0},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0},
        "train": {"out_dir": str(root / "ours"), "max_steps": steps, "log_every": 1, "save_every": 10_000,
                  "eval_every": 10_000, "global_batch_tokens": args.rows * args.seq, "micro_batch_size": args.micro,
                  "tensorboard": False, "device": "cpu", "compile": args.compile},
        "eval": {"val_batches": 0},
    })
    sft(config)
    lines = [json.loads(x) for x in (root / "ours" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {m["step"]: m["elapsed_s"] for m in lines if "loss" in m and "event" not in m}
    per_step = [elapsed[s] - elapsed[s - 1] for s in range(args.warmup + 1, steps + 1)]
    efficiency = json.loads((root / "ours" / "data_report.json").read_text())["packing_efficiency"]
    return {"step_s": statistics.median(per_step), "packing_efficiency": efficiency,
            "first_loss": lines[0].get("loss") if lines else None}


def trl_peer(root: Path, tokenizer_dir: Path, conversations: list, args) -> dict:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from smoltrain.config import ModelConfig
    from smoltrain.model.hf import to_hf_config
    from smoltrain.post.chat.template import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(tokenizer_dir)
    hf = to_hf_config(ModelConfig(**SHAPE, max_seq_len=args.seq))
    hf.pop("dtype", None)
    hf_config = AutoConfig.for_model(**hf)
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config)
    dataset = Dataset.from_list([{"messages": c.messages, "chat_template_kwargs": c.kwargs} for c in conversations])
    accumulation = args.rows // args.micro
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    config = SFTConfig(output_dir=str(root / "trl"), max_length=args.seq, packing=True, assistant_only_loss=True,
                       per_device_train_batch_size=args.micro, gradient_accumulation_steps=accumulation,
                       max_steps=args.warmup + args.steps, learning_rate=1e-3, lr_scheduler_type="constant",
                       max_grad_norm=1.0, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                       dataset_num_proc=1, bf16=False, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()])
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    per_step = [b - a for a, b in zip(times[args.warmup - 1 :], times[args.warmup :])]
    return {"step_s": statistics.median(per_step), "packing_efficiency": sum(lengths) / (len(lengths) * args.seq)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1200)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rows", type=int, default=16, help="packed rows per optimizer step")
    parser.add_argument("--micro", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer, conversations = prepare(root, args)
        mine = ours(root, tokenizer, args)
        peer = trl_peer(root, tokenizer, conversations, args)
    rates = {name: args.rows * args.seq * r["packing_efficiency"] / r["step_s"]
             for name, r in (("smoltrain", mine), ("trl", peer))}
    result = {
        "date": datetime.date.today().isoformat(), "device": f"{platform.machine()} CPU, {args.threads} threads",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "shape": "demo", "seq": args.seq, "rows_per_step": args.rows, "micro": args.micro,
        "conversations": args.conversations, "compile": args.compile,
        "step_s": {"smoltrain": mine["step_s"], "trl": peer["step_s"]},
        "packing_efficiency": {"smoltrain": mine["packing_efficiency"], "trl": peer["packing_efficiency"]},
        "real_tokens_per_s": rates, "ratio": rates["smoltrain"] / rates["trl"],
    }
    print(json.dumps(result, indent=2))
    print(f"smoltrain sft {rates['smoltrain']:,.0f} tokens/s, TRL SFTTrainer {rates['trl']:,.0f} tokens/s: "
          f"{result['ratio']:.2f}x; packing {100 * mine['packing_efficiency']:.1f}% vs {100 * peer['packing_efficiency']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
