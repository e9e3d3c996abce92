"""The demo's post-training: SFT -> preference pairs -> APO-zero -> GRPO -> merge, and each stage's report-card row.

Every stage is the library call behind its verb (`smoltrain sft|dpo|grpo|merge`, `data preferences`),
run on a recipe the demo writes into `<out>/recipes/` (so any stage can be re-run by hand) and
time-boxed by the Trainer's should_stop hook: steps are planned from the seconds the budget gives the
stage and the throughput measured for the chosen precision, and a slower-than-planned machine stops
after the step in flight instead of blowing the budget. APO's pairs are SmolLM3's strong-vs-weak recipe
in small with the policy as the weak side: chosen = the embedded reply that keeps the system prompt's
rule, rejected = the SFT model's own greedy reply where it breaks the rule (on-policy rejected replies
moved adherence +13 points where an early checkpoint's moved it +7, at the same learning rate; LOG.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console

from smoltrain import files
from smoltrain.config import Config
from smoltrain.errors import DataError, StoppedBySignal
from smoltrain.files import write_atomic

POST_STAGES = ("sft", "apo", "grpo", "merge")
ROWS = ("base", "sft", "apo", "grpo", "merged")  # the report card's rows, in playbook order
# The library module each post-training stage needs; a stage whose module is missing is skipped
# with "stage not available" in the report card instead of failing the whole demo.
STAGE_MODULES = {"sft": ("smoltrain.post.sft",), "apo": ("smoltrain.post.dpo", "smoltrain.post.preference_gen"),
                 "grpo": ("smoltrain.post.grpo_train",), "merge": ("smoltrain.post.merge",)}
CHAT_TOKENIZER = "chat-tokenizer"  # <out>/chat-tokenizer: the data tokenizer with the smollm3 template


@dataclass
class PostSizes:
    """How much each post-training stage and each row's evaluation does (the test shrinks all of it)."""

    conversations: int = 4000  # embedded SFT conversations (~125 tokens each at vocab 4096)
    sft_rows_per_step: int = 8  # small batches: twice the updates of 16 rows; measured better at this size
    # held-out items per chat-eval set and row: no_think and persona at +-2.5 points at 50% (~4 s a row on
    # 2 cores); the think set's long replies cost more (+-5 points). Stages are compared item by item.
    chat_items: int = 400
    think_items: int = 100
    suite_items: int = 100  # items per embedded pretraining task, per row
    val_batches: int = 8
    chat_new_tokens: int = 48  # no_think and persona replies
    think_new_tokens: int = 160
    sample_new_tokens: int = 120  # the side-by-side chats
    # training questions under a rule, per mode (no_think and think): a third to a half become pairs
    preference_prompts: int = 512
    rejected_temperature: float = 0.0  # greedy rejected replies (sampled at 1.0 they kept the rule twice as often)
    apo_pairs_per_step: int = 32
    apo_epochs: int = 2
    grpo_prompts_per_step: int = 64  # 8-16 were too few informative groups a step: accuracy fell (LOG.md)
    grpo_generations: int = 8
    grpo_max_prompt: int = 192  # the embedded word problems through the template: ~100 tokens
    grpo_max_completion: int = 48
    grpo_overlong_max_len: int = 32  # DAPO soft overlong: 0 up to 32 - 16 = 16 tokens ("The answer is 1234." ~8), -1 at 32
    grpo_overlong_cache: int = 16
    grpo_eval_count: int = 32
    soup_checkpoints: int = 3  # the last APO checkpoints averaged into the soup
    merge_weights: tuple[float, float] = (0.9, 0.1)  # soup, pretrained (SmolLM3: soup 0.9 + mid-training 0.1)


# Settings of the demo's model size (1.6M parameters): learning rates far above SmolLM3's 3B ones,
# with the playbook's ratios (APO 10x below SFT: 1e-4 moved adherence +0, 3e-4 +7 to +13, 1e-3 +10
# at twice the accuracy cost; LOG.md).
SFT_SETTINGS = {"lr": 3e-3, "min_lr": 3e-4, "schedule": "cosine", "grad_clip": 1.0, "weight_decay": 0.0}
APO_SETTINGS = {"lr": 3e-4, "min_lr": 3e-4, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0}
APO_LOSS = {"loss": "apo_zero", "beta": 0.1}
GRPO_SETTINGS = {"lr": 2e-4, "min_lr": 2e-4, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0}


# ----------------------------------------------------------------------------- small parts


def stage_available(stage: str) -> str | None:
    """None when the stage's library is installed, else why not (one line for the report card)."""
    import importlib.util

    for module in STAGE_MODULES.get(stage, ()):
        if importlib.util.find_spec(module) is None:
            return f"stage not available: {module} is not part of this smoltrain"
    return None


class Deadline:
    """The Trainer's should_stop hook for a stage's time box: True once `seconds` (at least `minimum`)
    have passed since it was made; the Trainer then finishes its step, saves and returns."""

    def __init__(self, seconds: float, console: Console, minimum: float = 10.0):
        self.at = time.monotonic() + max(seconds, minimum)
        self.console = console
        self.fired = False

    def __call__(self) -> bool:
        if not self.fired and time.monotonic() >= self.at:
            self.fired = True
            self.console.print("  time budget reached: asking the trainer to stop after this step")
        return self.fired


def time_boxed(run, config: Config, seconds: float, console: Console, minimum: float = 10.0) -> tuple[dict, bool]:
    """`run(config, should_stop=...)` within `seconds`; (summary, stopped by the deadline). A stop
    that the deadline did not ask for (Ctrl-C, an outside SIGTERM) stops the demo too."""
    deadline = Deadline(seconds, console, minimum)
    summary = run(config, should_stop=deadline)
    if summary.get("stopped_by") and not deadline.fired:
        raise StoppedBySignal(summary["stopped_by"])
    return summary, deadline.fired


def write_recipe(path: Path, raw: dict) -> Path:
    """A stage's recipe as YAML: what the demo ran, re-runnable with the stage's verb."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, yaml.safe_dump(raw, sort_keys=False))


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.write_json(path, value)


def _train_keys(pretrain: Config, out_dir: Path, init: str, max_steps: int, speed: dict, save_every: int,
                keep: int, log_every: int) -> dict:
    t = pretrain.train
    return {"init": str(init), "out_dir": str(out_dir), "max_steps": int(max_steps), "seed": t.seed,
            "log_every": max(1, log_every), "save_every": max(1, save_every), "eval_every": int(max_steps),
            "keep_checkpoints": keep, "device": t.device, "precision": speed["precision"], "compile": speed["compile"],
            "peak_tflops": t.peak_tflops, "tensorboard": False}


def _data_keys(pretrain: Config) -> dict:
    """The embedded data settings of the pretraining run (its tokenizer; forgetting is measured on it)."""
    d = pretrain.data
    return {"embedded": d.embedded, "embedded_vocab_size": d.embedded_vocab_size, "embedded_fraction": d.embedded_fraction,
            "cache_dir": d.cache_dir, "seq_len": d.seq_len}


# ----------------------------------------------------------------------------- SFT


def sft_recipe(pretrain: Config, pretrain_dir: Path, out_dir: Path, steps: int, speed: dict, sizes: PostSizes) -> dict:
    seq_len = pretrain.data.seq_len
    return {
        # the pretrained shape, rows as long as pretraining's: the merge with the base needs equal shapes
        "model": {"max_seq_len": pretrain.model.max_seq_len},
        "data": _data_keys(pretrain),
        "sft": {"data": ["embedded"], "embedded_conversations": sizes.conversations, "chat_template": "smollm3",
                "loss": "assistant", "packing": True, "epochs": None, "warmup_fraction": 0.03, "chat_eval_items": 0},
        "optim": dict(SFT_SETTINGS),
        "train": {**_train_keys(pretrain, out_dir, str(pretrain_dir), steps, speed, save_every=max(1, steps // 3),
                                keep=10, log_every=max(1, steps // 40)),
                  "global_batch_tokens": sizes.sft_rows_per_step * seq_len, "micro_batch_size": pretrain.train.micro_batch_size},
        "eval": {"val_batches": 0},
    }


def run_sft(recipe: Path, seconds: float, console: Console) -> dict:
    from smoltrain.post.sft import load_sft_config, sft

    config = load_sft_config(recipe)
    summary, stopped = time_boxed(sft, config, seconds, console)
    return {"summary": summary, "stopped_by_budget": stopped, "model": config.train.out_dir}


# ----------------------------------------------------------------------------- preference pairs and APO


def build_pairs(sft_dir: Path, out: Path, sizes: PostSizes, console: Console) -> dict:
    """Instruction-following pairs in both modes, as SmolLM3's APO gained IFEval: training questions
    under a system-prompt rule, chosen = the embedded reply that keeps the rule, rejected = the SFT
    model's own reply, kept where it breaks the rule (verify rule) and, on an arithmetic question, still
    answers right: the pair then differs in the rule alone (rule pairs whose rejected side also had
    wrong numbers took held-out accuracy from 31% to 14%; LOG.md). Where the model broke both, the
    right answer under another rule is the rejected side (without those pairs adherence on arithmetic
    questions fell, 82% -> 67%, while it rose on the others). The policy's own mistakes are the ones
    worth pushing down: they moved adherence about twice as far as an early checkpoint's."""
    from smoltrain.post.preference_gen import PERSONA, REFERENCE, build_preferences

    files, summaries = [], {}
    for mode, new_tokens in (("no_think", sizes.chat_new_tokens), ("think", sizes.think_new_tokens)):
        path = out / f"pairs_{mode}.jsonl"
        try:
            summaries[mode] = build_preferences(PERSONA, REFERENCE, str(sft_dir), path, mode=mode, verify="rule",
                                                count=sizes.preference_prompts, max_new_tokens=new_tokens, device="cpu",
                                                temperature=sizes.rejected_temperature)
        except DataError as e:  # "no pair was kept" in one mode leaves the other
            summaries[mode] = {"kept": 0, "error": str(e)}
            continue
        files.append(str(path))
        s = summaries[mode]
        console.print(f"  {mode}: kept {s['kept']} of {s['prompts']} pairs (the SFT model kept the rule on "
                      f"{s.get('rejected_adherence', 0):.0%}; {s['rejected_rewritten']} rejected replies with a wrong "
                      f"answer rewritten as the right one under another rule); dropped {s['dropped'] or 'none'}")
    return {"files": files, "rejected_model": str(sft_dir), "summaries": summaries,
            "kept": sum(s.get("kept", 0) for s in summaries.values())}


def apo_recipe(pretrain: Config, sft_dir: Path, tokenizer: Path, pairs: list[str], out_dir: Path, kept: int, speed: dict,
               sizes: PostSizes) -> dict:
    # a few hundred pairs: ~8 steps an epoch at most (a step of 32 pairs would leave 2 steps for 64 pairs)
    per_step = max(1, min(sizes.apo_pairs_per_step, kept, max(4, kept // 8)))
    micro = max(1, min(pretrain.train.micro_batch_size, per_step))
    per_step -= per_step % micro  # whole micro-batches (31 pairs would mean micro-batches of 1)
    steps = max(sizes.soup_checkpoints, sizes.apo_epochs * kept // per_step)
    return {
        "data": {"tokenizer": str(tokenizer)},  # SFT's, with its chat template: the soup and merge keep it
        "dpo": {**APO_LOSS, "train_data": pairs, "max_length": pretrain.data.seq_len, "pairs_per_step": per_step,
                "precompute": True},
        "optim": dict(APO_SETTINGS),
        # a checkpoint every ~sixth of the run (keeping them all): the soup averages the last few
        "train": {**_train_keys(pretrain, out_dir, str(sft_dir), steps, speed, save_every=max(1, steps // 6), keep=20,
                                log_every=1), "micro_batch_size": micro},
        "eval": {"val_batches": 0},
    }


def run_apo(recipe: Path, seconds: float, console: Console) -> dict:
    from smoltrain.post.dpo import load_dpo_config, run

    config = load_dpo_config(recipe)
    summary, stopped = time_boxed(run, config, seconds, console)
    return {"summary": summary, "stopped_by_budget": stopped, "model": config.train.out_dir}


# ----------------------------------------------------------------------------- GRPO


def grpo_recipe(pretrain: Config, init_dir: Path, tokenizer: Path, out_dir: Path, steps: int, speed: dict,
                sizes: PostSizes) -> dict:
    rows = sizes.grpo_prompts_per_step * sizes.grpo_generations
    micro = max(1, min(32, rows))
    return {
        "model": asdict(pretrain.model),
        "data": {"tokenizer": str(tokenizer), "seq_len": pretrain.data.seq_len},
        "grpo": {"prompts": "embedded", "mode": "no_think", "num_generations": sizes.grpo_generations,
                 "prompts_per_step": sizes.grpo_prompts_per_step, "max_prompt_length": sizes.grpo_max_prompt,
                 "max_completion_length": sizes.grpo_max_completion,
                 "rewards": {"math_answer": 1.0, "overlong": 1.0}, "overlong_max_len": sizes.grpo_overlong_max_len,
                 "overlong_cache": sizes.grpo_overlong_cache, "eval_count": sizes.grpo_eval_count, "pass_k": 1,
                 "loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.0},
        "optim": dict(GRPO_SETTINGS),
        # global_batch_tokens: the pretraining batch rule, checked for every run (GRPO's batch is its rollouts)
        "train": {**_train_keys(pretrain, out_dir, str(init_dir), steps, speed, save_every=steps, keep=2, log_every=1),
                  "micro_batch_size": micro, "global_batch_tokens": micro * pretrain.data.seq_len},
        "eval": {"val_batches": 0},
    }


def run_grpo(recipe: Path, seconds: float, console: Console) -> dict:
    from smoltrain.config import load_config
    from smoltrain.post.grpo_train import run

    config = load_config(recipe)
    summary, stopped = time_boxed(run, config, seconds, console)
    return {"summary": summary, "stopped_by_budget": stopped, "model": config.train.out_dir}


# ----------------------------------------------------------------------------- merge


def run_merge(apo_dir: Path, pretrain_dir: Path, out: Path, sizes: PostSizes) -> dict:
    """SmolLM3's release recipe: a linear soup of the last APO checkpoints, then 0.9 soup + 0.1 base."""
    from smoltrain.post.merge import last_checkpoints, merge

    available = len(list((apo_dir / "checkpoints").glob("step_*")))
    k = max(1, min(sizes.soup_checkpoints, available))
    checkpoints = [str(p) for p in last_checkpoints(apo_dir, k)]
    soup = merge(checkpoints, out / "soup")
    merged = merge([str(soup), str(pretrain_dir)], out / "merged", weights=list(sizes.merge_weights))
    return {"soup_of": checkpoints, "soup": str(soup), "model": str(merged), "weights": list(sizes.merge_weights)}


# ----------------------------------------------------------------------------- one row of the report card


def chat_tokenizer(data_tokenizer: str, out: Path):
    """The data tokenizer with the smollm3 chat template (what SFT writes into its run), written once."""
    from smoltrain.post.chat_template import load_chat_tokenizer, write_chat_tokenizer

    folder = out / CHAT_TOKENIZER
    if not (folder / "chat_template.jinja").is_file():
        write_chat_tokenizer(data_tokenizer, folder, "smollm3")
    return load_chat_tokenizer(folder)


def evaluate_row(model_path: str, tokenizer, data_tokenizer: str, eval_config: Config, sizes: PostSizes, out: Path,
                 pre_out: Path | None = None) -> dict:
    """The chat evals, the pretraining evals (validation loss per source, the embedded suite) and the
    side-by-side chats of one stage's model; written to `out` (JSON), the pretraining evals also to
    `pre_out` (JSON + markdown, as `smoltrain eval` writes them)."""
    from smoltrain.eval.run import evaluate
    from smoltrain.post.chat_eval import VIBE_PROMPTS, chat_evals, vibe_test
    from smoltrain.train.load_model import load_any

    start = time.perf_counter()
    model, _, _ = load_any(model_path)
    model = model.float().eval()
    with torch.no_grad():
        chat = chat_evals(model, tokenizer, count=sizes.chat_items, persona_count=sizes.chat_items,
                          think_count=sizes.think_items, max_new_tokens=sizes.chat_new_tokens,
                          think_max_new_tokens=sizes.think_new_tokens, per_item=True)
        samples = vibe_test(model, tokenizer, max_new_tokens=sizes.sample_new_tokens, prompts=VIBE_PROMPTS)
        pre = evaluate(model, ["embedded"], config=eval_config, tokenizer=data_tokenizer, limit=sizes.suite_items,
                       val_batches=sizes.val_batches, device="cpu", out=pre_out, progress=False)
    row = {"model": str(model_path), "chat": chat, "samples": samples, "val": pre["val"], "suite": pre["aggregate"],
           "tasks": pre["tasks"], "wall_s": time.perf_counter() - start}
    write_json(out, row)
    return row


__all__ = ["PostSizes", "POST_STAGES", "ROWS", "stage_available", "Deadline", "time_boxed", "sft_recipe", "run_sft",
           "build_pairs", "apo_recipe", "run_apo", "grpo_recipe", "run_grpo", "run_merge", "chat_tokenizer",
           "evaluate_row", "write_recipe", "write_json"]
