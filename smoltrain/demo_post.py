"""The demo's stage recipes (SFT, APO-zero, GRPO, long context), its preference pairs and merge, and
the evaluations behind the report card's rows and the long-context table.

Each recipe is what the stage's verb (`smoltrain sft|dpo|grpo|train`) would run, written by the demo
into `<out>/recipes/` so any stage can be re-run by hand. APO's pairs are SmolLM3's strong-vs-weak
recipe in small with the policy as the weak side: chosen = the embedded reply that keeps the system
prompt's rule, rejected = the SFT model's own reply where it breaks it (on-policy rejected replies moved
adherence +13 points where an early checkpoint's moved it +7, at the same learning rate; LOG.md).
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

# The library module each post-training stage needs; a stage whose module is missing is skipped
# with "stage not available" in the report card instead of failing the whole demo.
STAGE_MODULES = {"sft": ("smoltrain.post.sft.stage",), "apo": ("smoltrain.post.preference.stage", "smoltrain.post.preference.generate"),
                 "grpo": ("smoltrain.post.rl.stage",), "merge": ("smoltrain.post.merge",),
                 "long-context": ("smoltrain.eval.longctx",)}
LONG_CONTEXT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "long-context.yaml"
LONG_CONTEXT_FACTOR = 8  # the extension's length and RoPE base, times pretraining's (recipes/long-context.yaml)
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
    needles: int = 20  # single-needle items per length and model (+-11 points at 50%)
    needle_tokens: int = 12  # the needle's 7-digit value is ~5 tokens: RULER's 128 would triple the cost
    long_val_batches: int = 4  # validation rows per source for the loss by position


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


def time_boxed(run, config: Config, seconds: float, console: Console, minimum: float = 10.0) -> tuple[dict, bool]:
    """`run(config, should_stop=...)` within `seconds` (at least `minimum`): the Trainer's should_stop hook
    fires at the deadline and the Trainer finishes its step, saves and returns; (summary, stopped by the
    deadline). A stop that the deadline did not ask for (Ctrl-C, an outside SIGTERM) stops the demo too."""
    at, fired = time.monotonic() + max(seconds, minimum), []

    def deadline() -> bool:
        if not fired and time.monotonic() >= at:
            fired.append(True)
            console.print("  time budget reached: asking the trainer to stop after this step")
        return bool(fired)

    summary = run(config, should_stop=deadline)
    if summary.get("stopped_by") and not fired:
        raise StoppedBySignal(summary["stopped_by"])
    return summary, bool(fired)


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
    from smoltrain.post.preference.generate import PERSONA, REFERENCE, build_preferences

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


# ----------------------------------------------------------------------------- GRPO


def grpo_recipe(pretrain: Config, init_dir: Path, tokenizer: Path, out_dir: Path, steps: int, speed: dict,
                sizes: PostSizes) -> dict:
    rows = sizes.grpo_prompts_per_step * sizes.grpo_generations
    micro = max(1, min(32, rows))
    return {
        "model": asdict(pretrain.model),
        "data": {"tokenizer": str(tokenizer)},
        "grpo": {"prompts": "embedded", "mode": "no_think", "num_generations": sizes.grpo_generations,
                 "prompts_per_step": sizes.grpo_prompts_per_step, "max_prompt_length": sizes.grpo_max_prompt,
                 "max_completion_length": sizes.grpo_max_completion,
                 "rewards": {"math_answer": 1.0, "overlong": 1.0}, "overlong_max_len": sizes.grpo_overlong_max_len,
                 "overlong_cache": sizes.grpo_overlong_cache, "eval_count": sizes.grpo_eval_count, "pass_k": 1,
                 "loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.0},
        "optim": dict(GRPO_SETTINGS),
        "train": {**_train_keys(pretrain, out_dir, str(init_dir), steps, speed, save_every=steps, keep=2, log_every=1),
                  "micro_batch_size": micro},
        "eval": {"val_batches": 0},
    }


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


# ----------------------------------------------------------------------------- long context


def long_context_recipe(pretrain: Config, init: str, out_dir: Path, speed: dict) -> dict:
    """recipes/long-context.yaml on the demo model: its length and RoPE base both LONG_CONTEXT_FACTOR x
    pretraining's (ABF: 256 -> 2048 tokens, 10k -> 80k), on pretraining's embedded data (steps set by the demo)."""
    raw = files.load_yaml(LONG_CONTEXT_RECIPE)
    length = LONG_CONTEXT_FACTOR * pretrain.data.seq_len
    raw["model"].update(max_seq_len=length, rope_theta=LONG_CONTEXT_FACTOR * pretrain.model.rope_theta)
    raw["data"].update({**_data_keys(pretrain), "seq_len": length})
    micro = raw["train"]["micro_batch_size"]
    raw["train"] = {**_train_keys(pretrain, out_dir, init, raw["train"]["max_steps"], speed, save_every=1, keep=1,
                                  log_every=1), "micro_batch_size": micro, "global_batch_tokens": 2 * micro * length}
    raw["eval"] = {"tasks": [], "val_batches": 0}  # the demo scores it, and the model it started from, afterwards
    return raw


def long_context_evals(base: str, extended: str, data_tokenizer: str, pretrain: Config, length: int, sizes: PostSizes,
                       console: Console) -> dict:
    """Single-needle accuracy (RULER's niah_single_1) at 1x to 8x the training length and validation loss by
    position at 8x of the base model, the base stretched with YaRN (no training) and the ABF-extended model."""
    import dataclasses

    from smoltrain.config import RopeScaling
    from smoltrain.eval.longctx import LongContextTask, loss_by_position_per_source, score_long_context
    from smoltrain.eval.scoring import load_tokenizer
    from smoltrain.train.load_model import load_any

    trained, tokenizer = pretrain.data.seq_len, load_tokenizer(data_tokenizer)
    lengths = [trained * f for f in (1, 2, 4, 8) if trained * f <= length]
    long_data = dataclasses.replace(pretrain, data=dataclasses.replace(pretrain.data, seq_len=length))
    yarn = RopeScaling(factor=length / trained, original_max_seq_len=trained)
    models = {}
    for name, path, scaling in (("base", base, None), (f"base + YaRN x{length // trained}", base, yarn),
                                (f"ABF x{length // trained}", extended, None)):
        model = load_any(path)[0].float().eval()
        model.set_rope(max_seq_len=length, **({"scaling": scaling} if scaling else {}))
        with torch.no_grad():
            needle = {n: score_long_context(model, tokenizer, LongContextTask(
                f"niah_single_1@{n}", "niah_single_1", n, sizes.needles, answer_tokens=sizes.needle_tokens)) for n in lengths}
        curves = loss_by_position_per_source(model, long_data, sizes.long_val_batches, 2, 8)
        models[name] = {"needle": {str(n): r["ruler_match"] for n, r in needle.items()},  # str: as JSON keeps them
                        "needle_stderr": {str(n): r["ruler_match_stderr"] for n, r in needle.items()}, "loss_by_position": curves}
        console.print(f"  {name}: needle " + ", ".join(f"{n}: {r['ruler_match']:.0%}" for n, r in needle.items())
                      + "; loss by position " + ", ".join(f"{c['end']}: {c['loss']:.2f}" for c in curves["prose"]))
    return {"trained_length": trained, "length": length, "lengths": lengths, "models": models}


# ----------------------------------------------------------------------------- one row of the report card


def chat_tokenizer(data_tokenizer: str, out: Path):
    """The data tokenizer with the smollm3 chat template (what SFT writes into its run), written once."""
    from smoltrain.post.chat.template import load_chat_tokenizer, write_chat_tokenizer

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
    from smoltrain.post.chat.evals import VIBE_PROMPTS, chat_evals, vibe_test
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


__all__ = ["PostSizes", "stage_available", "time_boxed", "sft_recipe", "build_pairs", "apo_recipe",
           "grpo_recipe", "run_merge", "long_context_recipe", "long_context_evals", "chat_tokenizer", "evaluate_row",
           "write_recipe", "write_json"]
