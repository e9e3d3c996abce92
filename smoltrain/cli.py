"""Command line: argument parsing only, one `cmd_<verb>` function per verb, each a thin call into the
library function of the same name. User mistakes (SmoltrainError) become one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path

from smoltrain import __version__
from smoltrain.errors import ConfigError, SmoltrainError, StoppedBySignal
from smoltrain.files import output_folder, refuse_to_overwrite

# `data preferences`: at 256 new tokens a new user's SmolLM2-135M-Instruct pairs were dropped as cut
# (issue 24); 512 leaves room for a typical chat answer (a cut pair is dropped, and now counted).
PREFERENCE_NEW_TOKENS = 512


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def _add_training_args(parser: argparse.ArgumentParser, init_help: str, init_metavar: str = "MODEL_FOLDER") -> None:
    """A training verb's recipe, --set, --resume and --init (train.init)."""
    _add_config_args(parser)
    parser.add_argument("--resume", metavar="PATH", help="run folder or checkpoint folder to resume from")
    parser.add_argument("--init", metavar=init_metavar, help=init_help)


def _add_chat_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder, checkpoint, run folder or Hugging Face folder")
    parser.add_argument("--tokenizer", help="tokenizer folder, when the model has none")
    parser.add_argument("--template", choices=["smollm3", "chatml", "model"],
                        help="chat template (default: the one stored with the tokenizer)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


# ----------------------------------------------------------------------------- verbs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoltrain", description="Train small language models the SmolLM3 way.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"smoltrain {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_training_verbs(verbs)
    _add_planning_verbs(verbs)
    _add_model_file_verbs(verbs)
    _add_eval_and_chat_verbs(verbs)
    _add_run_verbs(verbs)
    _add_data_verbs(verbs)
    return parser


def _add_training_verbs(verbs) -> None:
    """Config, and the verbs that train: pretraining and the post-training objectives."""
    p = verbs.add_parser("config", help="print the resolved config of a recipe")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = verbs.add_parser("train", help="pretrain (resumes from the run folder's latest checkpoint)")
    _add_training_args(p, "start from these weights (model, HF, run or checkpoint folder)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although a data source changed since the checkpoint (its position restarts)")
    p.set_defaults(func=cmd_stage)

    p = verbs.add_parser("dpo", help="preference training (APO-zero, APO-down, DPO, IPO) from train.init")
    _add_training_args(p, "the model to start from, also the reference (train.init)")
    p.set_defaults(func=cmd_stage)

    p = verbs.add_parser("grpo", help="RL with verifiable rewards (GRPO, DAPO length penalty) in the training loop")
    _add_training_args(p, "start from these weights (an SFT or APO model folder)")
    p.set_defaults(func=cmd_stage)

    p = verbs.add_parser("sft", help="supervised fine-tuning on chat data (data check, packing, chat evals)")
    _add_training_args(p, "start from these weights (model, HF, run or checkpoint folder)", init_metavar="MODEL")
    p.set_defaults(func=cmd_stage)


def _add_planning_verbs(verbs) -> None:
    """Sizing a run before it starts: the plan and the pre-flight doctor."""
    p = verbs.add_parser("plan", help="parameters, FLOPs, memory, time or GPU count of a config")
    _add_config_args(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--gpus", type=int, help="GPUs to time the run on (default 1)")
    budget.add_argument("--days", type=float, help="target wall-clock days: print the GPUs needed instead")
    p.add_argument("--mfu", type=float, default=0.30, help="model FLOPs utilisation (default 0.30, SmolLM3's)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU (default train.peak_tflops, else H100 989)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("doctor", help="pre-flight: compute, memory, collectives, storage, loader and GPU health checks")
    p.add_argument("--recipe", help="also check this recipe's GEMM shapes, loader, memory and checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value of the recipe (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="token shard folder to check (repeatable; the recipe's sources are always checked)")
    p.add_argument("--checkpoints", metavar="DIR", help="checkpoint folder (default: the recipe's train.out_dir)")
    p.add_argument("--quick", action="store_true", help="shorter measurements: under a minute on one node")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write every figure and verdict to this JSON file")
    p.add_argument("--strict", action="store_true", help="exit 1 when any check FAILs (with --run: any finding)")
    p.add_argument("--run", metavar="RUN_DIR", help="instead: read a run folder's metrics and name what went wrong")
    p.add_argument("--matmul-tflops", type=float, help="with --run: the device's matmul rate (default: measured here)")
    p.set_defaults(func=cmd_doctor)


def _add_model_file_verbs(verbs) -> None:
    """Model folders in and out: Hugging Face export / import, merges."""
    p = verbs.add_parser("export", help="write a Hugging Face transformers folder or a GGUF file")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="model folder, run folder or checkpoint folder")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", help="output folder (a LoRA run exports its base with the adapters merged)")
    out.add_argument("--gguf", metavar="FILE", help="write one GGUF file for llama.cpp instead (weights, tokenizer, chat template)")
    p.add_argument("--adapter", metavar="OUT", help="a LoRA run's adapters as a PEFT adapter folder (for peft's PeftModel)")
    p.add_argument("--tokenizer", help="tokenizer.json or tokenizer folder (default: the one the model knows)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "q8_0"], default="auto",
                   help="weight dtype (auto: as stored; q8_0: GGUF only)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder or an existing --gguf file")
    p.add_argument("--check", action="store_true", help="load --out with transformers and compare its logits and greedy "
                   "continuation with ours on random tokens (exit 1 when they differ)")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("import", help="read a Hugging Face Llama / SmolLM3 / Qwen3 folder (or a GGUF file) into a model folder")
    p.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json + safetensors (+ tokenizer), or a .gguf file")
    p.add_argument("--out", required=True, help="output model folder (config.yaml + model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_import)

    p = verbs.add_parser("merge", help="linear merge (model soup) or slerp of models into a model folder")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model, Hugging Face, run or checkpoint folders")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model, normalised (default: uniform, a soup)")
    p.add_argument("--last", nargs=2, metavar=("K", "RUN_DIR"), help="also merge the run's newest K checkpoints")
    p.add_argument("--method", choices=["linear", "slerp"], default="linear")
    p.add_argument("--t", type=float, default=0.5, help="slerp position between the two models (0: the first)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weight dtype of the result (auto: the first model's)")
    p.add_argument("--eval", action="store_true", help="score every input and the merge on one suite, side by side")
    p.add_argument("--tasks", help="tasks for --eval (as `smoltrain eval --tasks`; default: the model's eval.tasks or embedded)")
    p.add_argument("--limit", type=int, help="items per task for --eval")
    p.add_argument("--device", default="auto", help="device for --eval")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_merge)


def _add_eval_and_chat_verbs(verbs) -> None:
    """Scoring a model, and talking to it through its chat template."""
    p = verbs.add_parser("eval", help="score a model on tasks (log-likelihood and generative) and validation data")
    p.add_argument("model", metavar="MODEL", help="model folder, checkpoint, run folder or Hugging Face folder")
    p.add_argument("--tasks", help="comma-separated: embedded, arithmetic, code_tokens, prose_cloze, F.jsonl, "
                   "ADAPTER=PATH (hellaswag, arc_easy, piqa, winogrande, openbookqa, commonsense_qa, mmlu, gsm8k); "
                   "@mcf for lettered choices; long context: TASK@LENGTH with TASK passkey, niah_single_1..3, "
                   "niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe (default: the config's eval.tasks, else embedded)")
    p.add_argument("--haystack", action="append", default=[], metavar="F.txt",
                   help="long-context tasks: text for the essay haystacks (repeatable; default: the embedded prose)")
    p.add_argument("--position-buckets", type=int,
                   help="validation loss by position in this many log-spaced buckets (the long-context curve)")
    p.add_argument("--yarn", type=float, metavar="FACTOR",
                   help="score with YaRN stretching the model's trained length FACTOR times (no training)")
    p.add_argument("--task-file", action="append", default=[], metavar="F.jsonl", help="a task file (repeatable)")
    p.add_argument("--limit", type=int, help="items per task")
    p.add_argument("--num-fewshot", type=int, help="solved examples before each item")
    p.add_argument("--samples", type=int, help="generative tasks: k sampled answers per item, scored as avg@k and pass@k")
    p.add_argument("--temperature", type=float, help="generative sampling temperature (default 0.8 with --samples)")
    p.add_argument("--batch-size", type=int, help="rows per forward pass")
    p.add_argument("--val-batches", type=int, help="validation batches per source (0: none)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder, when the model folder has none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="embedded suite and few-shot seed (default eval.seed)")
    p.add_argument("--validation", metavar="DIR", action="append", default=[],
                   help="validation shards for loss / bits per byte: a folder of .bin/.idx + meta.json "
                        "(SOURCE=DIR to name it; repeatable), e.g. for a Hugging Face folder")
    p.add_argument("--log-samples", action="store_true",
                   help="write every item's prompt, choices or generation, log-likelihoods and metrics to "
                        "results.samples.jsonl")
    p.add_argument("--out", default="results.json", help="results JSON (a markdown table is written beside it)")
    p.add_argument("--chat", action="store_true", help="the chat evals instead (held-out answers in both modes, "
                   "system-prompt adherence, think format, stop rate) through the model's chat template")
    p.add_argument("--template", choices=["smollm3", "chatml", "model"],
                   help="--chat: the chat template (default: the one stored with the tokenizer)")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("chat", help="talk to a model through its chat template (streaming; /think /no_think /system /reset)")
    _add_chat_model_args(p)
    p.add_argument("--system", help="system prompt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--think", dest="think", action="store_true", default=True, help="reasoning mode (default)")
    mode.add_argument("--no-think", dest="think", action="store_false", help="direct answers")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float)
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("generate", help="batched generation through the chat template (jsonl of messages or prompt)")
    _add_chat_model_args(p)
    p.add_argument("--input", required=True, metavar="F.jsonl", help="rows with messages (or prompt) and chat_template_kwargs")
    p.add_argument("--out", required=True, metavar="G.jsonl", help="the rows plus completions, completion_tokens, stopped")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--temperature", type=float, help="default 0 (greedy) for --n 1, else 0.8")
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("serve", help="an OpenAI-compatible API (/v1/chat/completions, /v1/completions) and a chat page at /")
    _add_chat_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SMOLTRAIN_API_KEY"),
                   help="every /v1 call needs Authorization: Bearer KEY (default: $SMOLTRAIN_API_KEY)")
    p.add_argument("--name", help="the model's id in the API (default: the folder's name)")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most tokens one reply may ask for")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="completions waiting for a row (a request with n counts n); beyond it: 503")
    p.set_defaults(func=cmd_serve)


def _add_run_verbs(verbs) -> None:
    """Whole runs: ablation grids, the demo, the report of a run folder."""
    p = verbs.add_parser("ablate", help="run a grid of (variant, seed) runs against a baseline and report verdicts")
    p.add_argument("ablation", metavar="ABLATION.yaml", help="baseline, variants, seeds, budget (recipes/ablations/)")
    p.add_argument("--out", help="output folder (default: the file's out_dir, else runs/ablations/NAME)")
    p.set_defaults(func=cmd_ablate)

    p = verbs.add_parser("demo", help="the whole playbook in miniature on the embedded corpus, with a report")
    p.add_argument("--out", default="runs/smoltrain-demo", help="output folder (default: runs/smoltrain-demo)")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget; training budgets adapt to it (default: 15)")
    p.add_argument("--recipe", help="demo recipe (default: recipes/demo.yaml)")
    p.add_argument("--stages", help="some of ablation,pretrain,sft,apo,grpo,merge,long-context to run (default: all "
                                    "but long-context); the others are reused from --from")
    p.add_argument("--from", dest="from_run", metavar="RUN",
                   help="an earlier demo folder whose finished stages are reused (default: --out itself with --stages)")
    p.add_argument("--ablation-steps", type=int, help="fixed steps per ablation run instead of a share of --minutes")
    p.add_argument("--pretrain-steps", type=int, help="fixed pretraining steps instead of the time that is left")
    p.add_argument("--started", type=float, metavar="EPOCH_S", help="when the command that runs the demo started "
                   "(`make demo` passes its own start): the budget counts the install and cold caches too")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="change a stage's recipe, e.g. --set sft:optim.lr=1e-3 (repeatable)")
    p.set_defaults(func=cmd_demo)

    p = verbs.add_parser("report", help="markdown + PNG + HTML report of a training run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run folder (config.yaml + metrics.jsonl)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)


def _add_data_verbs(verbs) -> None:
    """`smoltrain data SUBCOMMAND`: corpus, tokenizer, tokenizer report, shards, preference pairs."""
    p = verbs.add_parser("data", help="embedded corpus, tokenizer training and comparison, tokenization into shards")
    data = p.add_subparsers(dest="data_verb", required=True, metavar="SUBCOMMAND")
    q = data.add_parser("corpus", help="write the embedded corpus (prose, code, math; train/validation jsonl.gz)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--seed", type=int, default=0, help="seed of the split and the math generator")
    q.add_argument("--fraction", type=float, default=1.0, help="keep this share of every source")
    q.set_defaults(func=cmd_data_corpus)
    q = data.add_parser("tokenizer", help="train a byte-level BPE tokenizer (tokenizer.json for transformers)")
    q.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="jsonl, jsonl.gz, parquet or text files, or Hugging Face dataset folders (their only split, else train)")
    q.add_argument("--vocab-size", type=int, required=True)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--text-key", default="text", help="JSON key / parquet column of the text")
    q.add_argument("--max-mb", type=float, default=None, help="train on at most this much text, shared by the files")
    q.set_defaults(func=cmd_data_tokenizer)
    q = data.add_parser("tokenizer-report", help="fertility, split-word share and bytes/token per source")
    q.add_argument("--tokenizer", action="append", required=True, help="tokenizer.json or HF folder (repeatable)")
    q.add_argument("--input", nargs="+", required=True, metavar="GLOB", help="files; the source is the name's first dotted part")
    q.add_argument("--text-key", default="text")
    q.add_argument("--max-mb", type=float, default=2.0, help="text sampled per source")
    q.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    q.set_defaults(func=cmd_data_tokenizer_report)
    q = data.add_parser("tokenize", help="tokenize files into token shards (.bin + .idx + meta.json)")
    q.add_argument("--tokenizer", required=True, help="tokenizer.json or HF tokenizer folder")
    q.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="jsonl, jsonl.gz, parquet or text files, or Hugging Face dataset folders (save_to_disk or parquet snapshot)")
    q.add_argument("--split", help="split of a dataset folder (default: its only split, else train)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--text-key", default="text", help="JSON key / parquet column of the text")
    q.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    q.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    q.add_argument("--add-bos", action="store_true", help="start every document with the tokenizer's BOS token")
    q.add_argument("--name", default=None, help="shard name prefix (default: the output folder's name)")
    q.set_defaults(func=cmd_data_tokenize)

    q = data.add_parser("preferences", help="preference pairs: chosen answers from a strong model, rejected from a weak one")
    q.add_argument("--prompts", required=True, help="jsonl of prompts ('messages' or 'prompt', optional 'answer', "
                   "'reference'), 'embedded' (the embedded chat data's arithmetic, with worked solutions) or "
                   "'embedded:persona' (its questions under system-prompt rules, with replies that keep them)")
    q.add_argument("--chosen-model", required=True, help="strong model folder, or 'reference' (the rows' reference replies)")
    q.add_argument("--rejected-model", required=True, help="weak model folder")
    q.add_argument("--out", required=True, help="output jsonl (a .summary.json is written beside it)")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--think", dest="mode", action="store_const", const="think", help="answer in think mode")
    mode.add_argument("--no-think", dest="mode", action="store_const", const="no_think", help="answer in no_think mode")
    q.add_argument("--verify", choices=["math", "rule"], help="math: keep pairs whose chosen answer is right and rejected "
                   "wrong; rule: whose chosen reply keeps the system prompt's rule and rejected breaks it")
    q.add_argument("--count", type=int, help="use the first COUNT prompts")
    q.add_argument("--max-new-tokens", type=int, default=PREFERENCE_NEW_TOKENS,
                   help=f"longest answer, in tokens (default {PREFERENCE_NEW_TOKENS}); a pair whose answer reaches it is dropped")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    q.add_argument("--chat-template", choices=["smollm3", "chatml", "model"], help="default: each model's own")
    q.add_argument("--plain", action="store_true", help="plain-text prompts and answers, no chat template "
                   "(a pretrained model; answers end at the first blank line)")
    q.add_argument("--device", default="auto")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out file")
    q.set_defaults(func=cmd_data_preferences)


def cmd_config(args) -> int:
    from smoltrain.eval.during_training import check_eval_config
    from smoltrain.stages import stage_of_recipe
    from smoltrain.train.stage_config import read_recipe

    stage = stage_of_recipe(read_recipe(args.config))  # the config its run will use (the stage's defaults, steps)
    config = stage.load(args.config, args.overrides)
    if config.train.init and not Path(config.train.init).exists():  # a stage after one still to run
        print(f"# train.init {config.train.init}: not made yet; the model section below is the recipe's")
    if stage.plan_note is not None:
        print(f"# {stage.name}: {stage.plan_note(config)}")
    check_eval_config(config)
    print(config.to_yaml(), end="")
    return 0


def cmd_stage(args) -> int:
    """train, sft, dpo, grpo (smoltrain/stages.py): the stage's config from the recipe, --set and
    --init; a finished run is said so and trains nothing (exit 0); else the run and its exit status."""
    from smoltrain.eval.during_training import check_eval_config
    from smoltrain.stages import stage_of_verb

    stage = stage_of_verb(args.verb)
    config = stage.load(args.config, args.overrides, args.init)
    check_eval_config(config)
    if not stage.steps_from_data and _finished(args, config):
        return 0
    options = {"allow_data_change": True} if getattr(args, "allow_data_change", False) else {}
    return _exit_status(stage.run(config, resume=args.resume, **options))


def cmd_plan(args) -> int:
    import json

    from rich.console import Console

    from smoltrain.config import load_config
    from smoltrain.train.plan import plan, plan_table

    for name in ("gpus", "days", "mfu", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or (name == "mfu" and value > 1)):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive{' and at most 1' if name == 'mfu' else ''}, got {value}")
    result = plan(load_config(args.config, args.overrides), gpus=args.gpus, mfu=args.mfu,
                  peak_tflops=args.peak_tflops, days=args.days)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        Console().print(plan_table(result))
    return 0


def cmd_doctor(args) -> int:
    import os

    from smoltrain.doctor import exit_code, run
    from smoltrain.errors import ConfigError

    if args.run:
        return _doctor_run(args)
    if args.matmul_tflops is not None:
        raise ConfigError("--matmul-tflops goes with --run")
    result = run(args.recipe, args.overrides, args.data, args.checkpoints, args.quick, args.json_out)
    if args.json_out and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 writes and prints
        print(f"wrote {args.json_out}")
    return exit_code(result, args.strict)


def _doctor_run(args) -> int:
    from smoltrain.doctor.run import diagnose_run, exit_code
    from smoltrain.errors import ConfigError

    given = [flag for flag, value in (("--recipe", args.recipe), ("--set", args.overrides), ("--data", args.data),
                                      ("--checkpoints", args.checkpoints), ("--quick", args.quick)) if value]
    if given:
        raise ConfigError(f"--run reads a finished or running run: {', '.join(given)} belong to the pre-flight check")
    result = diagnose_run(args.run, args.json_out, args.matmul_tflops)
    if args.json_out:
        print(f"wrote {args.json_out}")
    return exit_code(result, args.strict)


def cmd_export(args) -> int:
    import torch
    from rich.console import Console

    from smoltrain.errors import ConfigError
    from smoltrain.report.hf_export import export_hf

    if args.gguf and args.adapter:
        raise ConfigError("export: --adapter writes a PEFT folder; use it alone or with --out, not with --gguf")
    if args.gguf:
        return _export_gguf(args)
    if args.dtype == "q8_0":
        raise ConfigError("--dtype q8_0 is a GGUF format: use it with --gguf FILE")
    if not args.out and not args.adapter:
        raise ConfigError("export: name an output with --out DIR or --gguf FILE (or --adapter OUT for a LoRA run's adapters)")
    if args.adapter:
        from smoltrain.train.lora import adapter_summary, export_adapter

        with Console(stderr=True).status(f"exporting the adapters of {args.model}"):
            adapter = export_adapter(args.model, args.adapter)
        print(f"wrote {adapter} (PEFT LoRA adapter: {adapter_summary(adapter)})")
        if not args.out:
            return 0
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    with Console(stderr=True).status(f"exporting {args.model}"), output_folder(args.out, args.overwrite, [args.model]) as tmp:
        export_hf(args.model, tmp, tokenizer=args.tokenizer, dtype=dtype)
    out = Path(args.out)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    tokenizer = "with tokenizer" if (out / "tokenizer.json").is_file() else "no tokenizer"
    print(f"wrote {out} ({architecture}, {tokenizer})")
    return _check_export(args.model, out) if args.check else 0


def _check_export(model_path: str, out: Path) -> int:
    """`export --check`: ours and transformers' on the same random tokens, both in fp32 (bf16 weights upcast alike)."""
    import torch

    from smoltrain.report.hf_export import check_export
    from smoltrain.train.load_model import load_any

    model = load_any(model_path)[0].float().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, min(64, model.config.max_seq_len)), generator=torch.Generator().manual_seed(0))
    checked = check_export(model, out, ids)
    same = checked["greedy_match"] and checked["max_logit_diff"] <= 1e-3
    print(f"check: transformers loads it as {checked['architecture']}; max |logit diff| {checked['max_logit_diff']:.1e} on random "
          f"tokens, greedy continuation {'identical' if checked['greedy_match'] else 'DIFFERENT'}: {'ok' if same else 'MISMATCH'}")
    return 0 if same else 1


def _export_gguf(args) -> int:
    from rich.console import Console

    from smoltrain.report.gguf_export import export_gguf

    if Path(args.gguf).exists() and not args.overwrite:
        raise ConfigError(f"{args.gguf}: exists; pass --overwrite to replace it")
    dtype = None if args.dtype == "auto" else args.dtype
    with Console(stderr=True).status(f"exporting {args.model} to GGUF"):
        architecture = export_gguf(args.model, args.gguf, tokenizer=args.tokenizer, dtype=dtype)
    print(f"wrote {args.gguf} (llama.cpp {architecture}, {dtype or 'dtype as stored'})")
    return 0


def cmd_import(args) -> int:
    from rich.console import Console

    from smoltrain.files import write_json
    from smoltrain.report.model_card import ORIGIN, import_origin
    from smoltrain.train.load_model import import_gguf, import_hf

    source = Path(args.hf_dir)
    if source.is_file() and source.suffix != ".gguf":
        raise ConfigError(f"{source}: import reads a Hugging Face folder (config.json + safetensors, + tokenizer) or a "
                          f".gguf file, not a {source.suffix or 'plain'} file")
    with Console(stderr=True).status(f"importing {args.hf_dir}"), output_folder(args.out, args.overwrite, [args.hf_dir]) as tmp:
        reader = import_gguf if args.hf_dir.endswith(".gguf") else import_hf
        reader(args.hf_dir, tmp)
        origin = import_origin(args.hf_dir)
        write_json(tmp / ORIGIN, origin)  # the model card of what is trained from it names it
    out = Path(args.out)
    print(f"origin: {origin['file']} ({origin['format']}, {origin['architecture']}); licence "
          f"{origin['license'] or 'not stated in the file'}")
    tokenizer = "with tokenizer" if (out / "tokenizer.json").is_file() else "no tokenizer"
    print(f"wrote {out} (model folder, {tokenizer})")
    return 0


def cmd_merge(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from smoltrain.post.merge import evaluate_side_by_side, last_checkpoints, merge, side_by_side_rows, write_side_by_side

    models = list(args.models)
    if args.last:
        try:
            k = int(args.last[0])
        except ValueError:
            raise ConfigError(f"--last takes K RUN_DIR with K an integer, got {args.last[0]!r}") from None
        models += [str(p) for p in last_checkpoints(args.last[1], k)]
    if not models:
        raise ConfigError("nothing to merge: name models, or --last K RUN_DIR")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    with Console(stderr=True).status(f"merging {len(models)} models"), output_folder(args.out, args.overwrite, models) as tmp:
        merge(models, tmp, weights=args.weights, method=args.method, t=args.t, dtype=dtype)
    out = Path(args.out)
    print(f"wrote {out} ({args.method} of {len(models)} models)")
    if args.eval:
        tasks = [t for t in (args.tasks or "").split(",") if t.strip()]
        result = evaluate_side_by_side(models + [str(out)], tasks, args.limit, args.device)
        header, rows = side_by_side_rows(result)
        table = Table()
        for name in header:
            table.add_column(name, no_wrap=True)  # task and metric names whole, also in a pipe or a log
        for row in rows:
            table.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 250).print(table)
        print(f"wrote {write_side_by_side(result, out)}")
    return 0


def cmd_eval(args) -> int:
    from smoltrain.eval.run import evaluate, print_table

    if args.chat:
        from smoltrain.post.chat.repl import chat_markdown, evaluate_chat

        report = evaluate_chat(args.model, args.out, device=args.device, count=args.limit or 50,
                               persona_count=args.limit or 48, seed=args.seed or 0, tokenizer=args.tokenizer,
                               template=args.template)
        print(chat_markdown(report["chat"]))
        print(f"wrote {args.out}")
        return 0

    for name in ("limit", "batch_size", "samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("num_fewshot", "val_batches", "temperature"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    tasks = [t for t in (args.tasks or "").split(",") if t.strip()]
    report = evaluate(args.model, tasks, task_files=args.task_file, limit=args.limit, num_fewshot=args.num_fewshot,
                      num_samples=args.samples, temperature=args.temperature, batch_size=args.batch_size,
                      val_batches=args.val_batches, device=args.device, tokenizer=args.tokenizer, seed=args.seed,
                      out=args.out, validation=args.validation, log_samples=args.log_samples,
                      haystack_files=args.haystack, position_buckets=args.position_buckets, yarn_factor=args.yarn)
    print_table(report)
    print(f"wrote {args.out}" + (f" and {report['samples']}" if report.get("samples") else ""))
    return 0


def cmd_chat(args) -> int:
    from smoltrain.post.chat.repl import chat_repl, load_chat_model

    model, tokenizer = load_chat_model(args.model, args.device, args.tokenizer, args.template)
    chat_repl(model, tokenizer, system=args.system, think=args.think, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p)
    return 0


def cmd_generate(args) -> int:
    from smoltrain.post.chat.repl import generate_file, load_chat_model

    model, tokenizer = load_chat_model(args.model, args.device, args.tokenizer, args.template)
    summary = generate_file(model, tokenizer, args.input, args.out, n=args.n, temperature=args.temperature,
                            top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            seed=args.seed)
    print(f"wrote {summary['out']}: {summary['completions']} completions for {summary['prompts']} prompts, "
          f"{summary['stopped']} stopped with <|im_end|>, {summary['mean_tokens']:.1f} tokens on average")
    return 0


def cmd_serve(args) -> int:
    from smoltrain.errors import ConfigError
    from smoltrain.serve import serve

    if min(args.max_tokens, args.max_batch, args.max_queue) < 1:
        raise ConfigError("--max-tokens, --max-batch and --max-queue must be positive")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or None, device=args.device,
          tokenizer=args.tokenizer, template=args.template, name=args.name, max_tokens=args.max_tokens,
          max_batch=args.max_batch, max_queue=args.max_queue)
    return 0


def cmd_ablate(args) -> int:
    from smoltrain.ablate.grid import ablate

    results = ablate(args.ablation, out_dir=args.out)
    for warning in results["parameter_warnings"].values():
        print(f"warning: {warning}", file=sys.stderr)
    for v in results["verdicts"]:
        print(f"{v['variant']:>24}  {v['metric']:<32} {v['difference']:+.4g}  {v['verdict']}")
    print(f"wrote {results['report_md']} and {results['report_html']}")
    return 0


def cmd_demo(args) -> int:
    from smoltrain.demo import demo
    from smoltrain.errors import ConfigError

    overrides: dict[str, list[str]] = {}
    for text in args.overrides:
        stage, colon, override = text.partition(":")
        if not colon or "=" not in override:
            raise ConfigError(f"--set {text}: expected STAGE:KEY=VALUE, e.g. sft:optim.lr=1e-3")
        overrides.setdefault(stage, []).append(override)
    steps = {k: v for k, v in (("ablation", args.ablation_steps), ("pretrain", args.pretrain_steps)) if v is not None}
    demo(args.out, args.minutes, args.recipe, stages=args.stages, from_run=args.from_run, started=args.started,
         steps=steps, overrides=overrides)
    return 0


def cmd_report(args) -> int:
    from smoltrain.report.run import report_run

    md_path, html_path = report_run(args.run_dir, args.out)
    print(f"wrote {md_path} and {html_path}")
    return 0


def cmd_data_corpus(args) -> int:
    from smoltrain.data.corpus import build_corpus

    manifest = build_corpus(args.out, seed=args.seed, fraction=args.fraction, progress=print)
    for name, f in manifest["files"].items():
        print(f"{name}: {f['documents']} documents, {f['characters'] / 1e6:.2f}M characters")
    return 0


def cmd_data_tokenizer(args) -> int:
    from smoltrain.data.tokenizer import train_tokenizer_files

    path = train_tokenizer_files(args.input, args.vocab_size, args.out, args.text_key, args.max_mb)
    print(f"wrote {path}")
    return 0


def cmd_data_tokenizer_report(args) -> int:
    import json

    from smoltrain.data.tokenizer import report_markdown, tokenizer_report

    report = tokenizer_report(args.tokenizer, args.input, args.text_key, args.max_mb)
    print(report_markdown(report), end="")
    if args.json_out:
        from smoltrain.files import write_json

        write_json(args.json_out, report)
        print(f"wrote {args.json_out}")
    else:
        print(json.dumps(report))
    return 0


def cmd_data_tokenize(args) -> int:
    from smoltrain.data.tokenize_shards import tokenize

    meta = tokenize(args.tokenizer, args.input, args.out, text_key=args.text_key, workers=args.workers,
                    skip_bad=args.skip_bad, add_bos=args.add_bos, name=args.name, split=args.split)
    rate = meta["num_tokens"] / max(1e-9, meta["elapsed_s"]) if meta["tokenized_files"] else 0.0
    print(f"{args.out}: {meta['num_tokens']:,} tokens, {meta['num_documents']:,} documents, "
          f"{len(meta['shards'])} shards ({meta['tokenized_files']} tokenized now, {rate / 1e6:.2f}M tokens/s)")
    skipped = sum(meta["skipped_records"].values())
    if skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(meta["skipped_records"].items()))
        print(f"skipped {skipped} bad records ({detail})")
    return 0


def cmd_data_preferences(args) -> int:
    from smoltrain.post.preference.generate import build_preferences

    for name in ("count", "max_new_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    refuse_to_overwrite(args.out, args.overwrite)  # the file itself is written atomically
    summary = build_preferences(args.prompts, args.chosen_model, args.rejected_model, args.out, mode=args.mode,
                                verify=args.verify, count=args.count, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, device=args.device,
                                chat_template=None if args.chat_template == "model" else args.chat_template,
                                temperature=args.temperature, plain=args.plain)
    dropped = ", ".join(f"{k}: {v}" for k, v in summary["dropped"].items()) or "none"
    print(f"{args.out}: kept {summary['kept']} of {summary['prompts']} pairs (dropped {dropped}); "
          f"mean length chosen {summary['chosen_chars_mean']:.0f} / rejected {summary['rejected_chars_mean']:.0f} characters")
    cut = summary["dropped"].get("cut_at_max_tokens", 0)
    if cut:
        print(f"{cut} pairs were dropped because an answer reached --max-new-tokens {args.max_new_tokens} (cut, not "
              f"finished): raise --max-new-tokens to keep them")
    return 0


# ----------------------------------------------------------------------------- entry


def _finished(args, config) -> bool:
    """A finished run (its checkpoint at train.max_steps) is said so, and trains nothing (exit 0).
    A stage whose data fixes the steps (SFT) asks itself, after reading it."""
    from smoltrain.train.checkpoint import finished_note

    note = finished_note(args.resume or config.train.out_dir, config.train.max_steps)
    if note and _is_main_rank():
        print(note)
    return note is not None


def _exit_status(summary: dict) -> int:
    """A training verb's status: 0, or 128 + the signal that stopped it (its checkpoint is saved; the
    conventional status tells a requeue script why)."""
    return 128 + signal.Signals[summary["stopped_by"]].value if summary["stopped_by"] else 0


def _is_main_rank() -> bool:
    """Under torchrun every rank runs the CLI; one line per mistake is enough."""
    return os.environ.get("RANK", "0") in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    try:
        status = args.func(args) or 0
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            # Under torchrun: what still holds a process group (the model's FSDP state, in reference
            # cycles) is freed now, its gloo threads joined, rather than at interpreter finalization,
            # where they aborted finished runs (exit 134: requeued by SLURM, red in CI).
            gc.collect()
        return status
    except SmoltrainError as e:
        if _is_main_rank():
            print(f"smoltrain {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except StoppedBySignal as e:  # a checkpoint was saved; the status tells a requeue script why
        if _is_main_rank():
            print(f"smoltrain {args.verb}: {e}", file=sys.stderr)
        return 128 + signal.Signals[e.signal_name].value
    except KeyboardInterrupt:
        print(f"smoltrain {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
