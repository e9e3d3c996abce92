"""What each step of the demo does (chain.py runs them in order): a training step completes its stage's recipe
(recipes/demo.yaml, recipes/demo/*.yaml, recipes/long-context.yaml) with its steps, starting model and speed, and
runs it through the stage registry in its time box (`run.train`); then the evaluation behind a report card row.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smoltrain import files
from smoltrain.config import Config
from smoltrain.errors import DataError

if TYPE_CHECKING:
    from smoltrain.demo.chain import DemoRun, Step

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
LONG_CONTEXT_FACTOR = 8  # the extension's length and RoPE base, times pretraining's
# Plan steps at (1 - PLAN_OVERHEAD) of the measured steady tokens/s: evaluations and saves, and a machine shared
# with others (planned at 85%, a quiet-looking run was cut at step 466 of 666, before its WSD decay). Planning
# short costs little: the time a stage leaves goes to the next ones.
PLAN_OVERHEAD = 0.35


@dataclass
class DemoSizes:
    """How much the demo's own work does: rows' evaluations, preference pairs, merge, long-context evals (what a
    stage trains is in its recipe; the test shrinks both)."""

    sft_rows_per_step: int = 8  # small batches: twice the updates of 16 rows; measured better at this size
    chat_items: int = 400  # held-out items per chat-eval set and row: +-2.5 points at 50% (~4 s a row on 2 cores)
    think_items: int = 100  # the think set's long replies cost more (+-5 points); rows are compared item by item
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


def planned_steps(seconds: float, tokens_per_step: float, rate: float, low: int, high: int) -> int:
    """The steps `rate` tokens/s trains in `seconds`, clipped to [low, high]."""
    return int(np.clip(seconds * rate / tokens_per_step, low, high))


def stage_recipe(name: str, run: DemoRun, out_dir: str, init: str, steps: int, speed: str, train: dict, **sections) -> dict:
    """recipes/<name>.yaml completed with where the stage starts and writes, its steps and speed settings ("fixed" or
    "variable" shapes), pretraining's seed, device and peak, then `train` and `sections` (mappings merged key by key)."""
    raw, t, speed = files.load_yaml(RECIPES / f"{name}.yaml"), run.pretrain_config.train, run.settings[speed]
    raw["train"] = {**raw.get("train", {}), "init": init, "out_dir": str(run.out / out_dir), "max_steps": int(steps),
                    "eval_every": int(steps), "seed": t.seed, "device": t.device, "precision": speed["precision"],
                    "compile": speed["compile"], "peak_tflops": t.peak_tflops, "tensorboard": False, **train}
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return raw


def data_keys(pretrain: Config, **changes) -> dict:
    """The pretraining run's embedded data settings (its tokenizer; forgetting is measured on it)."""
    keys = ("embedded", "embedded_vocab_size", "embedded_fraction", "cache_dir", "seq_len")
    return {**{key: getattr(pretrain.data, key) for key in keys}, **changes}


def ablation(run: DemoRun, step: Step) -> dict:
    """Intra-document masking on/off, 2 seeds, judged against the seed-to-seed spread."""
    from smoltrain.ablate.grid import ablate
    from smoltrain.ablate.spec import AblationSpec
    from smoltrain.report.run import median_of, read_metrics

    with run.bar(step.name, step.title):
        seconds, gbt = run.seconds_for("ablation"), run.gbt
        n = run.fixed_steps.get("ablation") or (planned_steps(seconds, 4 * gbt, run.rate, 6, 60) if run.rate else 60)
        run.console.print(f"  ablation budget: {n} steps x {gbt:,} tokens per run, 4 runs")
        raw = run.base_config.to_dict()
        raw["train"].update(eval_every=n, save_every=n, log_every=max(1, n // 10), tensorboard=False)
        raw["optim"]["warmup_steps"] = max(1, min(run.base.optim.warmup_steps, n // 10))
        results = ablate(spec=AblationSpec(
            name="document-masking", baseline=raw, variants={"baseline": [], "no-document-masking": ["model.document_masking=false"]},
            seeds=[0, 1], budget_steps=n, eval={"tasks": [], "val_batches": run.sizes.val_batches},
            out_dir=str(run.out / "ablation"), source=f"{run.facts['recipe']} (smoltrain demo)"), console=run.console)
        runs = [r for arm in results["arms"].values() for r in arm["runs"]]
        # Plan pretraining from the fastest run's steady tokens/s (the median of its logged intervals; a run of a few
        # steps is mostly startup, compile and evaluation) less PLAN_OVERHEAD, never below its tokens per wall second.
        # The ablation runs the chosen (compiled) configuration on purpose: the probe's few steps under-read a
        # compiled step ~3x (3.6k vs 11.5k tokens/s), and its cold compiles warm the caches.
        steady = max(median_of(read_metrics(r["run_dir"])[0], "tokens_per_s") or 0.0 for r in runs)
        run.rate = max(max(r["tokens"] / r["wall_s"] for r in runs), (1 - PLAN_OVERHEAD) * steady)
    return {"results": str(run.out / "ablation" / "results.json"), "steps": n, "planning_tokens_per_s": run.rate}


def pretrain(run: DemoRun, step: Step) -> dict:
    """The base model, its steps planned from the ablation's measured speed (else the probe's)."""
    from smoltrain.report.run import median_of, read_metrics

    with run.bar(step.name, step.title):
        seconds, gbt, rate = run.seconds_for("pretrain"), run.gbt, run.rate
        n = run.fixed_steps.get("pretrain") or (planned_steps(0.95 * seconds, gbt, rate, 10, 5000) if rate else run.base.train.max_steps)
        run.console.print(f"  {n} steps x {gbt:,} tokens" + (f" at {rate:,.0f} tokens/s" if rate else "")
                          + f", {run.settings['fixed'].get('name', 'the recipe precision')}")
        raw = run.base_config.to_dict()
        raw["train"].update(out_dir=str(run.out / "pretrain"), max_steps=n, save_every=n, eval_every=max(1, n // 4),
                            log_every=max(1, n // 50))
        raw["optim"]["warmup_steps"] = max(1, min(run.base.optim.warmup_steps, n // 10))
        record = run.train(step, raw, seconds)
    # its steady speed plans SFT and long context (the median of its logged intervals)
    return {**record, "config": str(run.out / "pretrain" / "config.yaml"), "steps": n,
            "tokens_per_s": median_of(read_metrics(record["model"])[0], "tokens_per_s")}


def sft(run: DemoRun, step: Step) -> dict:
    """SFT at pretraining's shape (the merge with the base needs equal shapes), steps planned from its steady tokens/s."""
    config = run.pretrain_config
    with run.bar(step.name, step.title):
        seconds, measured = run.seconds_for("sft"), run.records["pretrain"].get("tokens_per_s")
        rate = ((1 - PLAN_OVERHEAD) * measured if measured else run.rate) or run.settings["fixed"].get("tokens_per_s") or 1e4
        n = run.fixed_steps.get("sft") or planned_steps(0.9 * seconds, run.sizes.sft_rows_per_step * config.data.seq_len, rate, 3, 100_000)
        record = run.train(step, stage_recipe("demo/sft", run, "sft", run.start_model("sft"), n, "fixed", {
            "save_every": max(1, n // 3), "log_every": max(1, n // 40), "micro_batch_size": config.train.micro_batch_size,
            "global_batch_tokens": run.sizes.sft_rows_per_step * config.data.seq_len},
            model={"max_seq_len": config.model.max_seq_len}, data=data_keys(config)), seconds)
    return {**record, "tokenizer": str(Path(record["model"]) / "tokenizer" / "tokenizer.json")}


def apo(run: DemoRun, step: Step) -> dict | None:
    """Preference pairs from the SFT model's own rule-breaking replies, then APO-zero (None: no pair kept)."""
    with run.bar("preferences", "preference pairs: rule-keeping replies vs the SFT model's own rule-breaking ones"):
        pairs = build_pairs(run.records["sft"]["model"], run.out / "preferences", run.sizes, run.console)
    if not (kept := pairs["kept"]):
        run.records["apo"] = {"done": False, "skipped": "no preference pair was kept", "pairs": pairs}
        run.console.print("[yellow]apo: no preference pair was kept: stage skipped[/yellow]")
        return None
    with run.bar(step.name, step.title):
        # ~8 steps an epoch at most (32 pairs a step would leave 2 steps for 64 pairs), in whole micro-batches
        per_step = max(1, min(run.sizes.apo_pairs_per_step, kept, max(4, kept // 8)))
        micro = max(1, min(run.pretrain_config.train.micro_batch_size, per_step))
        per_step -= per_step % micro
        n = run.fixed_steps.get("apo") or max(run.sizes.soup_checkpoints, run.sizes.apo_epochs * kept // per_step)
        # a checkpoint every ~sixth of the run: the soup averages the last few; SFT's tokenizer (its chat template)
        train = {"save_every": max(1, n // 6), "micro_batch_size": micro}
        dpo = {"train_data": pairs["files"], "max_length": run.pretrain_config.data.seq_len, "pairs_per_step": per_step}
        raw = stage_recipe("demo/apo", run, "apo", run.start_model("apo"), n, "variable", train, dpo=dpo,
                           data={"tokenizer": run.records["sft"]["tokenizer"]})
        return {**run.train(step, raw, run.seconds_for("apo")), "pairs": pairs}


def build_pairs(sft_dir: str, out: Path, sizes: DemoSizes, console) -> dict:
    """SmolLM3's strong-vs-weak pairs in small, the policy the weak side, in both modes (as its APO gained IFEval):
    chosen = the embedded reply that keeps the system prompt's rule, rejected = the SFT model's own reply where it
    breaks it (on-policy rejected replies moved adherence +13 points, an early checkpoint's +7) and, on arithmetic,
    still answers right: the pair differs in the rule alone (wrong numbers on the rejected side took held-out
    accuracy from 31% to 14%). Where it broke both, the right answer under another rule is the rejected side."""
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
        console.print(f"  {mode}: kept {s['kept']} of {s['prompts']} pairs (the SFT model kept the rule on {s['rejected_adherence']:.0%}; "
                      f"{s['rejected_rewritten']} wrong answers rewritten under another rule); dropped {s['dropped'] or 'none'}")
    return {"files": paths, "rejected_model": sft_dir, "summaries": summaries, "kept": sum(s.get("kept", 0) for s in summaries.values())}


def grpo(run: DemoRun, step: Step) -> dict:
    """GRPO: the deadline decides (rollouts' speed is not probed; constant lr): a cap it comes before."""
    with run.bar(step.name, step.title):
        n = run.fixed_steps.get("grpo", 200)
        raw = stage_recipe("demo/grpo", run, "grpo", run.start_model("grpo"), n, "variable", {"save_every": n},
                           data={"tokenizer": run.records["sft"]["tokenizer"]})
        return run.train(step, raw, run.seconds_for("grpo"))


def merge(run: DemoRun, step: Step) -> dict:
    """SmolLM3's release recipe: a linear soup of the last APO checkpoints, then 0.9 soup + 0.1 base."""
    from smoltrain.post import merge as merging

    with run.bar(step.name, step.title):
        apo_dir, weights = run.records["apo"]["model"], list(run.sizes.merge_weights)
        k = max(1, min(run.sizes.soup_checkpoints, len(list((Path(apo_dir) / "checkpoints").glob("step_*")))))
        checkpoints = [str(p) for p in merging.last_checkpoints(apo_dir, k)]
        soup = merging.merge(checkpoints, run.out / "merge" / "soup")
        merged = merging.merge([str(soup), run.records["pretrain"]["model"]], run.out / "merge" / "merged", weights=weights)
        run.console.print(f"  soup of {len(checkpoints)} checkpoints -> {soup}; {weights[0]:g} soup + {weights[1]:g} base -> {merged}")
    return {"soup_of": checkpoints, "soup": str(soup), "model": str(merged), "weights": weights}


def long_context(run: DemoRun, step: Step) -> dict:
    """ABF in its time box: recipes/long-context.yaml at LONG_CONTEXT_FACTOR x pretraining's length and RoPE base (256 -> 2048
    tokens, 10k -> 80k) on its data; then the base model, the base with YaRN (untrained) and the extended one scored."""
    config, base_model = run.pretrain_config, run.records["pretrain"]["model"]
    length = LONG_CONTEXT_FACTOR * config.data.seq_len
    with run.bar(step.name, step.title):
        seconds = run.seconds_for("long-context")
        raw = stage_recipe("long-context", run, "long-context", base_model, 1, "fixed", {"keep_checkpoints": 1},
                           data=data_keys(config, seq_len=length), eval={"tasks": [], "val_batches": 0})  # scored afterwards
        gbt = raw["train"]["global_batch_tokens"] = 2 * raw["train"]["micro_batch_size"] * length
        # attention's share of a step grows with the length: planned at half pretraining's rate
        rate = 0.5 * (run.records["pretrain"].get("tokens_per_s") or run.rate or 1e4)
        n = run.fixed_steps.get("long-context") or planned_steps(0.9 * seconds, gbt, rate, 3, 5000)
        raw["train"].update(max_steps=n, eval_every=n, save_every=n, log_every=max(1, n // 20))
        raw["model"].update(max_seq_len=length, rope_theta=LONG_CONTEXT_FACTOR * config.model.rope_theta)
        raw["optim"]["warmup_steps"] = max(1, min(raw["optim"]["warmup_steps"], n // 10))
        record = run.train(step, raw, seconds)
    with run.bar("long-context evals", "long context: needle accuracy and loss by position, before and after"):
        record["evals"] = run.facts["long_context"] = long_context_evals(base_model, record["model"], run.data.tokenizer, config,
                                                                         length, run.sizes, run.console)
    return record


def long_context_evals(base: str, extended: str, data_tokenizer: str, pretrain: Config, length: int, sizes: DemoSizes, console) -> dict:
    """Single-needle accuracy at 1x to 8x the training length and validation loss by position at 8x of the base model,
    the base stretched with YaRN (no training) and the ABF-extended model."""
    import torch

    from smoltrain.config import RopeScaling
    from smoltrain.eval.longctx import compare_extension
    from smoltrain.eval.scoring import load_tokenizer
    from smoltrain.train.load_model import load_any

    trained, factor = pretrain.data.seq_len, length // pretrain.data.seq_len

    def stretched(path: str, **rope):
        model = load_any(path)[0].float().eval()
        model.set_rope(max_seq_len=length, **rope)
        return model

    yarn, lengths = RopeScaling(factor=factor, original_max_seq_len=trained), [trained * f for f in (1, 2, 4, 8) if trained * f <= length]
    variants = (("base", base, {}), (f"base + YaRN x{factor}", base, {"scaling": yarn}), (f"ABF x{factor}", extended, {}))
    with torch.no_grad():
        models = compare_extension(((name, stretched(path, **rope)) for name, path, rope in variants), load_tokenizer(data_tokenizer),
                                   dataclasses.replace(pretrain, data=dataclasses.replace(pretrain.data, seq_len=length)), lengths,
                                   sizes.needles, sizes.needle_tokens, sizes.long_val_batches)
    for name, m in models.items():
        console.print(f"  {name}: needle " + ", ".join(f"{n}: {v:.0%}" for n, v in m["needle"].items())
                      + "; loss by position " + ", ".join(f"{c['end']}: {c['loss']:.2f}" for c in m["loss_by_position"]["prose"]))
    return {"trained_length": trained, "length": length, "lengths": lengths, "models": models}


def evaluate_row(model_path: str, tokenizer, data_tokenizer: str, eval_config: Config, sizes: DemoSizes, out: Path,
                 pre_out: Path | None = None) -> dict:
    """A report card row: the chat evals (item by item), the pretraining evals (validation loss per source, the embedded
    suite) and side-by-side chats of a stage's model; to `out` (JSON), the pretraining evals also to `pre_out` as `eval` does."""
    from smoltrain.eval.run import evaluate
    from smoltrain.post.stage_eval import run_chat_evals
    from smoltrain.train.load_model import load_any

    start, model = time.perf_counter(), load_any(model_path)[0].float().eval()
    chat = run_chat_evals(model, tokenizer, sizes.chat_items, vibe=True, vibe_new_tokens=sizes.sample_new_tokens, per_item=True,
                          think_count=sizes.think_items, max_new_tokens=sizes.chat_new_tokens, think_max_new_tokens=sizes.think_new_tokens)
    pre = evaluate(model, ["embedded"], config=eval_config, tokenizer=data_tokenizer, limit=sizes.suite_items,
                   val_batches=sizes.val_batches, device="cpu", out=pre_out, progress=False)
    row = {"model": str(model_path), "chat": chat["chat"], "samples": chat["vibe"], "val": pre["val"], "suite": pre["aggregate"],
           "tasks": pre["tasks"], "wall_s": time.perf_counter() - start}
    files.write_json(out, row)
    return row
