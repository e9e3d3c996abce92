"""The demo's stage recipes (recipes/demo/*.yaml and recipes/long-context.yaml completed with what the demo
decides), its preference pairs and merge, and the evaluations behind the report card's rows.

APO's pairs are SmolLM3's strong-vs-weak recipe in small with the policy as the weak side: chosen = the
embedded reply that keeps the system prompt's rule, rejected = the SFT model's own reply where it breaks it
(on-policy rejected replies moved adherence +13 points where an early checkpoint's moved it +7; LOG.md).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from smoltrain import files
from smoltrain.config import Config
from smoltrain.errors import DataError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
LONG_CONTEXT_FACTOR = 8  # the extension's length and RoPE base, times pretraining's


@dataclass
class PostSizes:
    """How much the demo's own work does: rows' evaluations, preference pairs, merge, long-context evals
    (what a stage trains is in its recipe; the test shrinks both)."""

    sft_rows_per_step: int = 8  # small batches: twice the updates of 16 rows; measured better at this size
    # held-out items per chat-eval set and row: no_think and persona at +-2.5 points at 50% (~4 s a row on
    # 2 cores); the think set's long replies cost more (+-5 points). Stages are compared item by item.
    chat_items: int = 400
    think_items: int = 100
    suite_items: int = 100  # items per embedded pretraining task, per row
    val_batches: int = 8  # per source, during training and in each row (the same windows: one comparable curve)
    chat_new_tokens: int = 48  # no_think and persona replies
    think_new_tokens: int = 160
    sample_new_tokens: int = 120  # the side-by-side chats
    preference_prompts: int = 512  # questions under a rule, per mode: a third to a half become pairs
    rejected_temperature: float = 0.0  # greedy rejected replies (sampled at 1.0 they kept the rule twice as often)
    apo_pairs_per_step: int = 32
    apo_epochs: int = 2
    soup_checkpoints: int = 3  # the last APO checkpoints averaged into the soup
    merge_weights: tuple[float, float] = (0.9, 0.1)  # soup, pretrained (SmolLM3: soup 0.9 + mid-training 0.1)
    needles: int = 20  # single-needle items per length and model (+-11 points at 50%)
    needle_tokens: int = 12  # the needle's 7-digit value is ~5 tokens: RULER's 128 would triple the cost
    long_val_batches: int = 4  # validation rows per source for the loss by position


def stage_recipe(name: str, pretrain: Config, init: str, out_dir: Path, steps: int, speed: dict, train: dict, **sections) -> dict:
    """recipes/<name>.yaml completed with where the stage starts and writes, its steps and speed settings,
    pretraining's seed, device and peak, then `train` and `sections` (mappings merged key by key)."""
    raw, t = files.load_yaml(RECIPES / f"{name}.yaml"), pretrain.train
    raw["train"] = {**raw.get("train", {}), "init": str(init), "out_dir": str(out_dir), "max_steps": int(steps),
                    "eval_every": int(steps), "seed": t.seed, "device": t.device, "precision": speed["precision"],
                    "compile": speed["compile"], "peak_tflops": t.peak_tflops, "tensorboard": False, **train}
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return raw


def data_keys(pretrain: Config, **changes) -> dict:
    """The pretraining run's embedded data settings (its tokenizer; forgetting is measured on it)."""
    d = pretrain.data
    return {"embedded": d.embedded, "embedded_vocab_size": d.embedded_vocab_size, "embedded_fraction": d.embedded_fraction,
            "cache_dir": d.cache_dir, "seq_len": d.seq_len, **changes}


def sft_recipe(pretrain: Config, init: str, out_dir: Path, steps: int, speed: dict, sizes: PostSizes) -> dict:
    # the pretrained shape, rows as long as pretraining's: the merge with the base needs equal shapes
    return stage_recipe("demo/sft", pretrain, init, out_dir, steps, speed, {
        "save_every": max(1, steps // 3), "log_every": max(1, steps // 40), "micro_batch_size": pretrain.train.micro_batch_size,
        "global_batch_tokens": sizes.sft_rows_per_step * pretrain.data.seq_len},
        model={"max_seq_len": pretrain.model.max_seq_len}, data=data_keys(pretrain))


def apo_recipe(pretrain: Config, init: str, tokenizer: str, pairs: dict, out_dir: Path, speed: dict, sizes: PostSizes) -> dict:
    kept = pairs["kept"]
    # a few hundred pairs: ~8 steps an epoch at most (a step of 32 pairs would leave 2 steps for 64 pairs), in
    # whole micro-batches (31 pairs would mean micro-batches of 1)
    per_step = max(1, min(sizes.apo_pairs_per_step, kept, max(4, kept // 8)))
    micro = max(1, min(pretrain.train.micro_batch_size, per_step))
    per_step -= per_step % micro
    steps = max(sizes.soup_checkpoints, sizes.apo_epochs * kept // per_step)
    # a checkpoint every ~sixth of the run (keeping them all): the soup averages the last few
    return stage_recipe("demo/apo", pretrain, init, out_dir, steps, speed, {"save_every": max(1, steps // 6), "micro_batch_size": micro},
                        data={"tokenizer": tokenizer},  # SFT's, with its chat template: the soup and merge keep it
                        dpo={"train_data": pairs["files"], "max_length": pretrain.data.seq_len, "pairs_per_step": per_step})


def long_context_recipe(pretrain: Config, init: str, out_dir: Path, speed: dict) -> dict:
    """recipes/long-context.yaml on the demo model: length and RoPE base both LONG_CONTEXT_FACTOR x pretraining's
    (ABF: 256 -> 2048 tokens, 10k -> 80k), on pretraining's embedded data (steps set by the demo)."""
    length = LONG_CONTEXT_FACTOR * pretrain.data.seq_len
    raw = stage_recipe("long-context", pretrain, init, out_dir, 1, speed, {"save_every": 1, "keep_checkpoints": 1, "log_every": 1})
    raw["train"]["global_batch_tokens"] = 2 * raw["train"]["micro_batch_size"] * length
    raw["model"].update(max_seq_len=length, rope_theta=LONG_CONTEXT_FACTOR * pretrain.model.rope_theta)
    raw["data"].update(data_keys(pretrain, seq_len=length))
    raw["eval"] = {"tasks": [], "val_batches": 0}  # the demo scores it, and the model it started from, afterwards
    return raw


def build_pairs(sft_dir: str, out: Path, sizes: PostSizes, console: Console) -> dict:
    """Instruction-following pairs in both modes, as SmolLM3's APO gained IFEval: training questions under a
    system-prompt rule, chosen = the embedded reply that keeps the rule, rejected = the SFT model's own reply,
    kept where it breaks the rule and, on an arithmetic question, still answers right: the pair then differs in
    the rule alone (pairs whose rejected side also had wrong numbers took held-out accuracy from 31% to 14%).
    Where the model broke both, the right answer under another rule is the rejected side (without those pairs
    adherence on arithmetic questions fell, 82% -> 67%)."""
    from smoltrain.post.preference.generate import PERSONA, REFERENCE, build_preferences

    paths, summaries = [], {}
    for mode, new_tokens in (("no_think", sizes.chat_new_tokens), ("think", sizes.think_new_tokens)):
        try:
            s = summaries[mode] = build_preferences(
                PERSONA, REFERENCE, sft_dir, out / f"pairs_{mode}.jsonl", mode=mode, verify="rule", count=sizes.preference_prompts,
                max_new_tokens=new_tokens, device="cpu", temperature=sizes.rejected_temperature)
        except DataError as e:  # "no pair was kept" in one mode leaves the other
            summaries[mode] = {"kept": 0, "error": str(e)}
            continue
        paths.append(str(out / f"pairs_{mode}.jsonl"))
        console.print(f"  {mode}: kept {s['kept']} of {s['prompts']} pairs (the SFT model kept the rule on "
                      f"{s.get('rejected_adherence', 0):.0%}; {s['rejected_rewritten']} rejected replies with a wrong answer "
                      f"rewritten as the right one under another rule); dropped {s['dropped'] or 'none'}")
    return {"files": paths, "rejected_model": sft_dir, "summaries": summaries, "kept": sum(s.get("kept", 0) for s in summaries.values())}


def run_merge(apo_dir: str, pretrain_dir: str, out: Path, sizes: PostSizes) -> dict:
    """SmolLM3's release recipe: a linear soup of the last APO checkpoints, then 0.9 soup + 0.1 base."""
    from smoltrain.post.merge import last_checkpoints, merge

    k = max(1, min(sizes.soup_checkpoints, len(list((Path(apo_dir) / "checkpoints").glob("step_*")))))
    checkpoints = [str(p) for p in last_checkpoints(apo_dir, k)]
    soup = merge(checkpoints, out / "soup")
    merged = merge([str(soup), pretrain_dir], out / "merged", weights=list(sizes.merge_weights))
    return {"soup_of": checkpoints, "soup": str(soup), "model": str(merged), "weights": list(sizes.merge_weights)}


def long_context_evals(base: str, extended: str, data_tokenizer: str, pretrain: Config, length: int, sizes: PostSizes,
                       console: Console) -> dict:
    """Single-needle accuracy at 1x to 8x the training length and validation loss by position at 8x of the base
    model, the base stretched with YaRN (no training) and the ABF-extended model."""
    from smoltrain.config import RopeScaling
    from smoltrain.eval.longctx import compare_extension
    from smoltrain.eval.scoring import load_tokenizer
    from smoltrain.train.load_model import load_any

    trained, factor = pretrain.data.seq_len, length // pretrain.data.seq_len

    def stretched(path: str, **rope):
        model = load_any(path)[0].float().eval()
        model.set_rope(max_seq_len=length, **rope)
        return model

    yarn = RopeScaling(factor=factor, original_max_seq_len=trained)
    lengths = [trained * f for f in (1, 2, 4, 8) if trained * f <= length]
    with torch.no_grad():
        models = compare_extension(
            ((name, stretched(path, **rope)) for name, path, rope in (("base", base, {}), (f"base + YaRN x{factor}", base, {"scaling": yarn}),
                                                                     (f"ABF x{factor}", extended, {}))),
            load_tokenizer(data_tokenizer), dataclasses.replace(pretrain, data=dataclasses.replace(pretrain.data, seq_len=length)),
            lengths, sizes.needles, sizes.needle_tokens, sizes.long_val_batches)
    for name, m in models.items():
        console.print(f"  {name}: needle " + ", ".join(f"{n}: {v:.0%}" for n, v in m["needle"].items())
                      + "; loss by position " + ", ".join(f"{c['end']}: {c['loss']:.2f}" for c in m["loss_by_position"]["prose"]))
    return {"trained_length": trained, "length": length, "lengths": lengths, "models": models}


def evaluate_row(model_path: str, tokenizer, data_tokenizer: str, eval_config: Config, sizes: PostSizes, out: Path,
                 pre_out: Path | None = None) -> dict:
    """One row of the report card: the chat evals (item by item), the pretraining evals (validation loss per source,
    the embedded suite) and the side-by-side chats of one stage's model; written to `out` (JSON), the pretraining
    evals also to `pre_out` (JSON + markdown, as `smoltrain eval` writes them)."""
    from smoltrain.eval.run import evaluate
    from smoltrain.post.stage_eval import run_chat_evals
    from smoltrain.train.load_model import load_any

    start, model = time.perf_counter(), load_any(model_path)[0].float().eval()
    chat = run_chat_evals(model, tokenizer, sizes.chat_items, vibe=True, vibe_new_tokens=sizes.sample_new_tokens, think_count=sizes.think_items,
                          max_new_tokens=sizes.chat_new_tokens, think_max_new_tokens=sizes.think_new_tokens, per_item=True)
    pre = evaluate(model, ["embedded"], config=eval_config, tokenizer=data_tokenizer, limit=sizes.suite_items,
                   val_batches=sizes.val_batches, device="cpu", out=pre_out, progress=False)
    row = {"model": str(model_path), "chat": chat["chat"], "samples": chat["vibe"], "val": pre["val"], "suite": pre["aggregate"],
           "tasks": pre["tasks"], "wall_s": time.perf_counter() - start}
    files.write_json(out, row)
    return row
