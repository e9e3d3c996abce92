"""One GRPO step, smoltrain vs TRL's GRPOTrainer (no vLLM: transformers' generate), same run.

Same model (ours, exported to transformers for TRL), same tokenizer and chat template, same prompts
(embedded arithmetic, no_think), same G, prompts per step, max_completion_length and sampling
temperature, same reward function (our math_answer, handed to TRL as a plain function), one
optimizer step per rollout batch (mu = 1, beta = 0, loss dapo), AdamW, fp32, on this CPU. A step is
rollouts + rewards + forward/backward + optimizer step; the median of the timed steps after warm-up,
in wall-clock seconds and in this process's CPU seconds (with one thread, the number that a shared,
loaded machine does not inflate).

    PYTHONPATH=. OMP_NUM_THREADS=2 python bench/grpo_step.py [--steps 4] [--prompts 4] [--generations 4]

Weights are random, so completions run to max_completion_length on both sides (equal work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(tmp: Path, args) -> Path:
    from smoltrain.config import config_from_dict
    from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
    from smoltrain.model.transformer import build_model
    from smoltrain.post.chat.template import write_chat_tokenizer
    from smoltrain.post.embedded import arithmetic_items
    from smoltrain.train.load_model import save_model_folder

    texts = [item["question"] + " " + " ".join(item["steps"]) for item in arithmetic_items("train", 400)]
    save_tokenizer(train_tokenizer(texts * 2, args.vocab, False), tmp / "base")
    write_chat_tokenizer(tmp / "base", tmp / "tok", "smollm3")
    heads = max(1, args.hidden // 64)
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                 num_kv_heads=max(1, heads // 2), intermediate_size=args.hidden * 8 // 3 // 64 * 64, max_seq_len=512)
    config = config_from_dict({"model": shape, "data": {"seq_len": 256}, "train": {"micro_batch_size": 1, "global_batch_tokens": 256}})
    save_model_folder(build_model(config.model, seed=0), config, tmp / "model", tokenizer=tmp / "tok")
    return tmp / "model"


def ours(model_dir: Path, args) -> list[float]:
    import yaml

    from smoltrain.config import config_from_dict
    from smoltrain.post.rl.stage import build_grpo_objective
    from smoltrain.train.distributed import single_process_context
    from smoltrain.train.optim import build_optimizer
    from smoltrain.train.trainer import build_training_model, forward_backward

    rows = args.prompts * args.generations
    config = config_from_dict({
        "model": yaml.safe_load((model_dir / "config.yaml").read_text())["model"],
        "data": {"seq_len": 256, "tokenizer": str(model_dir)},
        "optim": {"lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"micro_batch_size": rows, "global_batch_tokens": 256 * rows, "init": str(model_dir), "device": "cpu",
                  "precision": "fp32", "compile": "off", "max_steps": args.steps + args.warmup},
        "grpo": {"num_generations": args.generations, "prompts_per_step": args.prompts, "temperature": 1.0,
                 "max_completion_length": args.completion_tokens, "rewards": {"math_answer": 1.0}, "eval_count": 4},
    })
    ctx = single_process_context(torch.device("cpu"), config.train)
    model = build_training_model(config, ctx.device, init_from=str(model_dir), ctx=ctx)
    optimizer = build_optimizer(config.optim, model)
    with tempfile.TemporaryDirectory() as run_dir:
        objective = build_grpo_objective(config, model, ctx, Path(run_dir))
        times = []
        for _ in range(args.steps + args.warmup):
            start = (time.perf_counter(), time.process_time())
            micro = [objective.batches.next_batch() for _ in range(objective.accumulation(0, 1))]
            forward_backward(model, objective, micro, ctx, config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append((time.perf_counter() - start[0], time.process_time() - start[1]))
    return times[args.warmup:]


def trl(model_dir: Path, args) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from smoltrain.post.embedded import arithmetic_prompts
    from smoltrain.post.rl.rewards import math_answer
    from smoltrain.report.hf_export import export_hf

    hf_dir = model_dir.parent / "hf"
    export_hf(model_dir, hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    count = args.prompts * (args.steps + args.warmup)
    rows = [{"prompt": p["messages"], "answer": p["answer"], "chat_template_kwargs": {"enable_thinking": False}}
            for p in arithmetic_prompts("train", count, 0, "no_think")]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return math_answer(prompts, texts, completion_ids, answer=answer)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.generations,
                            num_generations=args.generations, gradient_accumulation_steps=1,
                            max_completion_length=args.completion_tokens, temperature=1.0,
                            max_steps=args.steps + args.warmup, learning_rate=1e-6, beta=0.0, loss_type="dapo",
                            use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
                            dataloader_num_workers=0, bf16=False, lr_scheduler_type="constant", warmup_steps=0,
                            weight_decay=0.0, max_grad_norm=1.0, seed=0, disable_tqdm=True, shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_list(rows), callbacks=[StepTimer()])
        trainer.train()
    return times[args.warmup:]


def main() -> None:
    from smoltrain.doctor.environment import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="G: completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=64, help="max_completion_length")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp), args)
        ours_times, trl_times = ours(model_dir, args), trl(model_dir, args)
    ours_s, ours_cpu = (statistics.median(t[i] for t in ours_times) for i in (0, 1))
    trl_s, trl_cpu = (statistics.median(t[i] for t in trl_times) for i in (0, 1))
    import transformers
    import trl as trl_module

    print(json.dumps({
        "bench": "grpo_step", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl_module.__version__, "shape": f"hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}",
        "prompts_per_step": args.prompts, "num_generations": args.generations,
        "max_completion_length": args.completion_tokens, "smoltrain_step_s": round(ours_s, 4),
        "trl_step_s": round(trl_s, 4), "ratio_trl_over_smoltrain": round(trl_s / ours_s, 3),
        "smoltrain_step_cpu_s": round(ours_cpu, 4), "trl_step_cpu_s": round(trl_cpu, 4),
        "cpu_ratio_trl_over_smoltrain": round(trl_cpu / ours_cpu, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
