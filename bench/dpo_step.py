"""A DPO training step, smoltrain vs TRL's DPOTrainer (precompute_ref_log_probs=True), same run.

Same model (ours, exported to transformers for TRL), same tokenizer, same preference pairs, same
batch (pairs per step), same loss (APO-zero, beta 0.1), AdamW, fp32, on this CPU. Both sides
precompute the reference log-probs before training; only optimizer steps are timed, in CPU seconds
of this process (median after
warm-up; rounds alternate the two sides and the ratio is the median of the rounds'). smoltrain's step
is the Trainer's own `forward_backward` + optimizer step with the DPO
objective; TRL's is `Trainer.training_step` + optimizer step, timed by a callback.

    PYTHONPATH=. OMP_NUM_THREADS=2 python bench/dpo_step.py [--rounds 3] [--steps 4] [--pairs 8]

Needs trl (and datasets, accelerate) importable; prints the ratio TRL step time / ours.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three four five six seven "
         "eight nine zero red green blue yellow black white the a of and to in is it that was").split()


def clock() -> float:
    """CPU seconds of this process (all its threads): on a machine shared with other jobs, wall time
    measures their load as much as ours; CPU time measures the work a step costs."""
    return time.process_time()


def make_rows(n: int, prompt_words: int, answer_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": text(prompt_words) + ":", "chosen": " " + text(answer_words),
             "rejected": " " + text(rng.randint(answer_words // 2, answer_words))} for _ in range(n)]


def build(tmp: Path, args) -> tuple[Path, Path]:
    from smoltrain.config import config_from_dict
    from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
    from smoltrain.model.transformer import build_model
    from smoltrain.train.load_model import save_model_folder

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(200)]
    save_tokenizer(train_tokenizer(corpus, args.vocab, False), tmp / "tok")
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                 num_kv_heads=max(1, args.hidden // 128), intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                 max_seq_len=1024, tie_embeddings=True)
    config = config_from_dict({"model": shape, "data": {"seq_len": 256},
                               "train": {"micro_batch_size": 1, "global_batch_tokens": 256}})
    save_model_folder(build_model(config.model, seed=0), config, tmp / "model", tokenizer=tmp / "tok")
    rows = make_rows(args.pairs * (args.steps + args.warmup), args.prompt_words, args.answer_words, 1)
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "model", data


def ours(model_dir: Path, data: Path, args) -> list[float]:
    from smoltrain.config import config_from_dict
    from smoltrain.post.preference.stage import build_dpo_objective
    from smoltrain.train.distributed import single_process_context
    from smoltrain.train.optim import build_optimizer
    from smoltrain.train.trainer import build_training_model, forward_backward

    config = config_from_dict({
        "model": json.loads(json.dumps(__import__("yaml").safe_load((model_dir / "config.yaml").read_text())["model"])),
        "data": {"seq_len": 256, "tokenizer": str(model_dir)},
        "optim": {"lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"micro_batch_size": args.pairs, "global_batch_tokens": 256 * args.pairs, "init": str(model_dir),
                  "device": "cpu", "precision": "fp32", "compile": "off", "max_steps": args.steps + args.warmup},
        "dpo": {"train_data": [str(data)], "loss": "apo_zero", "beta": 0.1, "pairs_per_step": args.pairs,
                "max_length": 1024},
    })
    ctx = single_process_context(torch.device("cpu"), config.train)
    model = build_training_model(config, ctx.device, init_from=str(model_dir), ctx=ctx)
    optimizer = build_optimizer(config.optim, model)
    with tempfile.TemporaryDirectory() as run_dir:
        objective = build_dpo_objective(config, model, ctx, Path(run_dir))  # the reference pass, untimed
        times = []
        for _ in range(args.steps + args.warmup):
            start = clock()
            micro = [objective.batches.next_batch() for _ in range(objective.accumulation(1024, 1))]
            forward_backward(model, objective, micro, ctx, config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(clock() - start)
    return times[args.warmup:]


def trl(model_dir: Path, data: Path, args) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from smoltrain.report.hf_export import export_hf

    hf_dir = model_dir.parent / "hf"
    export_hf(model_dir, hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = clock()

        def on_step_end(self, *a, **k):
            times.append(clock() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
                           max_steps=args.steps + args.warmup, learning_rate=1e-6, beta=0.1, loss_type=["apo_zero"],
                           precompute_ref_log_probs=True, precompute_ref_batch_size=args.pairs, use_cpu=True,
                           report_to="none", save_strategy="no", logging_steps=10_000, max_length=1024,
                           dataloader_num_workers=0, bf16=False, lr_scheduler_type="constant", warmup_steps=0,
                           weight_decay=0.0, max_grad_norm=1.0, seed=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(rows), callbacks=[StepTimer()])
        trainer.train()
    return times[args.warmup:]


def main() -> None:
    from smoltrain.doctor.environment import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the two sides (a shared machine's "
                        "load drifts; each round compares neighbours in time)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (one micro-batch)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--answer-words", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours_s, trl_s, ratios, rounds = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = build(Path(tmp), args)
        for _ in range(args.rounds):
            a = ours(model_dir, data, args)
            b = trl(model_dir, data, args)
            ours_s += a
            trl_s += b
            ratios.append(statistics.median(b) / statistics.median(a))
            rounds.append([round(statistics.median(a), 3), round(statistics.median(b), 3)])
    import transformers
    import trl as trl_module

    print(json.dumps({
        "bench": "dpo_step", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl_module.__version__, "shape": f"hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}",
        "pairs_per_step": args.pairs, "steps": len(ours_s), "smoltrain_step_cpu_s": round(statistics.median(ours_s), 4),
        "trl_step_cpu_s": round(statistics.median(trl_s), 4), "rounds_smoltrain_trl_s": rounds,
        "round_ratios": [round(r, 3) for r in ratios],
        "ratio_trl_over_smoltrain": round(statistics.median(ratios), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
