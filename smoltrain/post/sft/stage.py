"""Supervised fine-tuning: `sft(config)` reads conversations, checks them, packs them and trains the
SFT objective in the one Trainer loop (train/trainer.py), with chat evals and a vibe test.

The data check runs before any model is built: the report (data_report.md / .json in the run
folder) is printed, and a system prompt missing from its rendered chat stops the run. Defaults are
SmolLM3's SFT: lr 2e-5, cosine to 10% with ~3% warmup, grad clip 0.2, assistant-only loss, packing.
The chat template is written with the tokenizer into the run folder (run/tokenizer/), which the
config points at, so checkpoints, `smoltrain export` and `smoltrain chat` all render with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rich.console import Console
from torch import nn

from smoltrain.config import Config, register_stage_config, replace_sections, require
from smoltrain.errors import ConfigError
from smoltrain.eval.during_training import DuringTraining
from smoltrain.files import write_atomic
from smoltrain.post.chat.template import (
    end_of_turn_id,
    has_generation_markers,
    load_chat_tokenizer,
    missing_chat_tokens,
    write_chat_tokenizer,
)
from smoltrain.post.sft.data import PackedChatBatches, report_markdown
from smoltrain.post.sft.prepare import Settings, load_prepared, named_files, prepare
from smoltrain.post.stage_eval import CHAT_AFTER, CHAT_BEFORE, evaluate_start, run_chat_evals, write_record
from smoltrain.train.checkpoint import finished_note
from smoltrain.train.pretrain import PretrainObjective
from smoltrain.train.stage_config import load_stage_config, resolve_tokenizer

console = Console(highlight=False, markup=False, soft_wrap=True)

# SmolLM3's SFT (and mid-training): used for every optim key the recipe does not set.
SFT_OPTIM = {"lr": 2e-5, "schedule": "cosine", "grad_clip": 0.2, "weight_decay": 0.0}
MIN_LR_SHARE = 0.1  # cosine to 10% of the peak


# ----------------------------------------------------------------------------- config


@dataclass
class SFTSourceWeight:
    """One source of an SFT mixture: set weight or epochs (SmolLM3 weighs each dataset of its mixture)."""

    weight: Optional[float] = None  # conversations per sft epoch, a multiple of the source's (0.5: a seeded half; 2: each twice)
    epochs: Optional[float] = None  # or passes over the source in the whole run (needs sft.epochs): weight = epochs / sft.epochs


@dataclass
class SFTConfig:
    # Conversation files (jsonl, jsonl.gz, parquet, json lists; globs allowed), Hugging Face dataset folders (save_to_disk
    # or a parquet snapshot), or "embedded", the embedded chat data. "NAME=PATTERN" names the source of all the files a
    # pattern matches (else: each file's first dotted part).
    data: list[str] = field(default_factory=lambda: ["embedded"])
    split: Optional[str] = None  # of dataset folders in data (default: their only split, else train)
    mixture: dict[str, SFTSourceWeight] = field(default_factory=dict)  # source name -> weight or epochs; absent: weight 1
    embedded_conversations: int = 8000
    chat_template: Literal["smollm3", "chatml", "gemma", "model"] = "smollm3"  # model: the init model's own
    loss: Literal["assistant", "all"] = "assistant"  # assistant: content + <|im_end|> of assistant turns only
    packing: bool = True  # best-fit decreasing into rows of data.seq_len; false: one conversation per row
    overflow: Literal["truncate", "drop"] = "truncate"  # a conversation longer than a row: keep its start, or skip it
    skip_bad: bool = False  # count and skip bad rows instead of stopping at the first
    # Move chat_template_kwargs.custom_instructions into a system message (when there is none), for
    # templates that do not read the keyword (SmolLM2's, chatml); the data check still verifies it.
    instructions_as_system: bool = False
    # Add the template's special tokens the init tokenizer lacks (<think> / </think> for SmolLM2), growing the
    # embedding and head: new rows at the mean embedding (TRL's chat-format setup); the init stays untouched.
    add_special_tokens: bool = False
    epochs: Optional[float] = 2.0  # sets train.max_steps from the packed rows; null: train.max_steps as given
    warmup_fraction: Optional[float] = 0.03  # sets optim.warmup_steps to this share of the steps (SmolLM3: ~3%); null: as given
    chat_eval_items: int = 50  # held-out items per chat eval set at every evaluation (0: none)


def validate_sft(s: SFTConfig) -> None:
    require(s.epochs is None or s.epochs > 0, f"sft.epochs must be positive (or null), got {s.epochs}")
    require(s.warmup_fraction is None or 0 <= s.warmup_fraction < 1,
            f"sft.warmup_fraction must lie in [0, 1) (or null), got {s.warmup_fraction}")
    require(s.chat_eval_items >= 0, f"sft.chat_eval_items must be >= 0, got {s.chat_eval_items}")
    require(s.embedded_conversations > 0, f"sft.embedded_conversations must be positive, got {s.embedded_conversations}")
    require(bool(s.data), "sft.data must name at least one file (or embedded)")
    for name, source in s.mixture.items():
        require((source.weight is None) != (source.epochs is None), f"sft.mixture.{name}: set weight or epochs (one of them)")
        require((source.weight or source.epochs or 0) > 0, f"sft.mixture.{name}: weight and epochs must be positive")
        require(source.epochs is None or s.epochs is not None,
                f"sft.mixture.{name}.epochs needs sft.epochs (the run's passes); with train.max_steps set weight instead")


@dataclass
class SFTRunConfig(Config):
    """A run's config with the SFT section composed in."""

    sft: SFTConfig = field(default_factory=SFTConfig)

    def validate_stage(self) -> None:
        validate_sft(self.sft)


register_stage_config("sft", SFTRunConfig)


def load_sft_config(path: str | os.PathLike | dict | None, overrides: list[str] | None = None, init: str | None = None) -> Config:
    """The recipe through the one stage loader (train/stage_config.py), with SmolLM3's SFT optimizer
    defaults for the keys it leaves out and the model section taken from train.init (the recipe may
    still set non-shape keys such as attention_kernel)."""
    return load_stage_config(path, overrides or [], init, cls=SFTRunConfig, optim_defaults=SFT_OPTIM,
                             min_lr_share=MIN_LR_SHARE, prepare=_explicit_steps_win)


def _explicit_steps_win(raw: dict, init_model: dict | None) -> None:
    """A train.max_steps / optim.warmup_steps the recipe or --set gives wins over the steps sft.epochs /
    sft.warmup_fraction would derive (both default on): the run, its config.yaml and `smoltrain config` agree."""
    section = raw["sft"] = raw.get("sft") if isinstance(raw.get("sft"), dict) else {}
    if "max_steps" in (raw.get("train") or {}):
        section["epochs"] = None
    if "warmup_steps" in raw["optim"]:
        section["warmup_fraction"] = None


def describe_step_plan(config: Config) -> str:
    """Where train.max_steps and optim.warmup_steps come from, for `smoltrain config` and the start line."""
    s = config.sft
    steps = (f"sft.epochs {s.epochs:g} x the packed rows" if s.epochs is not None
             else f"train.max_steps {config.train.max_steps} as given (sft.epochs not used)")
    warmup = (f"sft.warmup_fraction {s.warmup_fraction:g} of the steps" if s.warmup_fraction is not None
              else f"optim.warmup_steps {config.optim.warmup_steps} as given (sft.warmup_fraction not used)")
    return f"steps from {steps}; warmup from {warmup}"


# ----------------------------------------------------------------------------- data


def _data_files(config: Config) -> list[str]:
    files = []
    for item in config.sft.data:
        if item == "embedded":
            from smoltrain.post.embedded import ensure_embedded_chat

            files += ensure_embedded_chat(config.data.cache_dir, config.train.seed, config.sft.embedded_conversations)
        else:
            files.append(item)
    return files


@dataclasses.dataclass
class PreparedData:
    examples: object  # ShardExamples: example i read from the prepared shards
    rows: object  # PackingPlan
    report: dict
    tokenizer: object
    pad_id: int
    folder: Path  # the prepared folder in the cache


def mixture_weights(s) -> dict[str, float]:
    """sft.mixture as conversations per sft epoch: epochs over the whole run become epochs / sft.epochs."""
    return {name: w.weight if w.weight is not None else w.epochs / s.epochs for name, w in s.mixture.items()}


def prepare_sft_data(config: Config, tokenizer_dir: Path) -> PreparedData:
    """Rendered, tokenized, checked and packed once into the cache (post/sft/prepare.py), then opened;
    the report is the data check's result."""
    s = config.sft
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    if s.loss == "assistant" and not has_generation_markers(tokenizer.chat_template):
        raise ConfigError(f"sft.loss: assistant needs a chat template with {{% generation %}} markers and the "
                          f"{s.chat_template} template has none; use sft.chat_template smollm3, chatml or gemma, or sft.loss all")
    settings = Settings(config.data.seq_len, s.chat_template, s.loss, s.overflow, s.packing, s.instructions_as_system,
                        s.skip_bad, mixture_weights(s), s.split)
    folder = prepare(named_files(_data_files(config)), tokenizer_dir, settings, config.data.cache_dir)
    examples, rows, report = load_prepared(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    return PreparedData(examples, rows, report, tokenizer, pad_id, folder)


def with_chat_tokens(config: Config, tokenizer: str, out: Path) -> tuple[Config, str]:
    """sft.add_special_tokens: the init model and tokenizer with the template's missing special tokens
    added, in `out` (made once, reused on resume), and the config pointing at it. The embedding (and an
    untied head) grow by one row per token, each new row the mean of the old ones, as TRL's chat-format
    setup starts them: the model's outputs on the old tokens do not change."""
    missing = missing_chat_tokens(tokenizer, config.sft.chat_template)
    if not missing or not config.train.init:
        return config, tokenizer
    if not (out / "config.yaml").is_file():
        _grow_init(config.train.init, tokenizer, missing, out)
    from smoltrain.train.load_model import load_any

    _, grown, grown_tokenizer = load_any(out)
    model = dataclasses.replace(config.model, vocab_size=grown.model.vocab_size)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"sft: added {', '.join(missing)} to the tokenizer; embedding and head grown to {model.vocab_size} "
                      f"rows (new rows at the mean embedding) in {out}")
    return replace_sections(config, model=model, train=dataclasses.replace(config.train, init=str(out))), str(grown_tokenizer)


def _grow_init(init: str, tokenizer: str, tokens: list[str], out: Path) -> None:
    """Write the grown model folder; built aside and renamed, so ranks that race here agree on one."""
    import shutil

    import torch
    from tokenizers import AddedToken, Tokenizer

    from smoltrain.model.transformer import build_model
    from smoltrain.train.load_model import load_any, save_model_folder

    model, init_config, _ = load_any(init)
    grown = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else tokenizer))
    grown.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    shape = dataclasses.replace(init_config.model, vocab_size=max(init_config.model.vocab_size, grown.get_vocab_size()))
    state = model.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < shape.vocab_size:
            old = state[name]
            state[name] = torch.cat([old, old.mean(dim=0, keepdim=True).expand(shape.vocab_size - old.shape[0], -1)])
    resized = build_model(shape)
    resized.load_state_dict(state)
    staging = out.with_name(f".{out.name}.{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    grown.save(str(Path(f"{staging}.tokenizer.json")))
    try:
        save_model_folder(resized, replace_sections(init_config, model=shape), staging, tokenizer=f"{staging}.tokenizer.json")
        staging.rename(out)
    except OSError:
        if not (out / "config.yaml").is_file():  # not another rank's finished folder: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        Path(f"{staging}.tokenizer.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the objective


class SFTObjective(PretrainObjective):
    """Pretraining's summed cross-entropy and token batches, on the packed rows' labels (assistant
    tokens, or all); the Trainer divides by the label tokens of the whole step. The batch source's
    position is all the state there is. evaluate() runs the chat evals and keeps a vibe test."""

    name = "sft"

    def __init__(self, config: Config, batches: PackedChatBatches, tokenizer, run_dir: Path, is_main: bool):
        super().__init__(config, batches)
        self.tokenizer, self.run_dir, self.is_main = tokenizer, run_dir, is_main
        self.last_chat: dict | None = None

    def step_metrics(self) -> dict:
        return {"epoch": round(self.batches.epoch, 4)}

    def evaluate(self, model: nn.Module) -> dict:
        items = self.config.sft.chat_eval_items
        if not items:
            return {}
        self.last_chat = run_chat_evals(model, self.tokenizer, items, vibe=True)
        if self.is_main:
            write_record(self.run_dir / CHAT_AFTER, self.last_chat)
        return {"chat": self.last_chat["chat"]}


def build_sft_objective_factory(prepared: PreparedData):
    def build(config: Config, model: nn.Module, ctx, run_dir: Path) -> SFTObjective:
        if config.data.stages:
            raise ConfigError("data.stages: SFT data has one stage; remove the stages from the recipe")
        if config.sft.packing and not config.model.document_masking:
            raise ConfigError("sft.packing needs model.document_masking: true (no attention across conversations)")
        batches = PackedChatBatches(prepared.examples, prepared.rows, config.data.seq_len, config.train.micro_batch_size,
                                    prepared.pad_id, seed=config.train.seed, dp_rank=ctx.dp_rank, dp_world=ctx.dp_world)
        objective = SFTObjective(config, batches, prepared.tokenizer, run_dir, ctx.is_main)
        objective.accumulation(config.data.seq_len, ctx.dp_world)  # a bad batch split fails now
        if config.sft.chat_eval_items:  # the init model, before any step: the "before" column of the report
            evaluate_start(run_dir, CHAT_BEFORE, lambda: run_chat_evals(model, prepared.tokenizer, config.sft.chat_eval_items,
                                                                        vibe=True), config.train.init, ctx.is_main)
        return objective

    return build


# ----------------------------------------------------------------------------- the stage


def sft(config: Config, resume: str | None = None, should_stop=None) -> dict:
    """`smoltrain sft`: data check, then the Trainer with the SFT objective; returns the summary.
    should_stop: the Trainer's hook (the demo's time box)."""
    from smoltrain.train.trainer import Trainer

    run_dir = Path(config.train.out_dir)
    tokenizer_dir = run_dir / "tokenizer"
    source = resolve_tokenizer(config)
    if config.sft.add_special_tokens:
        config, source = with_chat_tokens(config, source, run_dir / "init_with_chat_tokens")
    write_chat_tokenizer(source, tokenizer_dir, config.sft.chat_template)
    prepared = prepare_sft_data(config, tokenizer_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        write_atomic(run_dir / "data_report.json", json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n")
        write_atomic(run_dir / "data_report.md", report_markdown(prepared.report))
        console.print(report_markdown({**prepared.report, "rendered_examples": {}}).rstrip())
    rows_per_step = config.train.global_batch_tokens // config.data.seq_len
    train, optim = config.train, config.optim
    if config.sft.epochs is not None:
        train = dataclasses.replace(train, max_steps=max(1, math.ceil(config.sft.epochs * len(prepared.rows) / rows_per_step)))
    if config.sft.warmup_fraction is not None:
        optim = dataclasses.replace(optim, warmup_steps=round(config.sft.warmup_fraction * train.max_steps))
    data = dataclasses.replace(config.data, tokenizer=str((tokenizer_dir / "tokenizer.json").resolve()))
    config = replace_sections(config, train=train, optim=optim, data=data)
    finished = finished_note(resume or run_dir, train.max_steps)
    if finished:  # as `smoltrain train` does: nothing to train, and the report stays as it was
        if main:
            console.print(finished)
        last = run_dir / "summary.json"
        return {**(json.loads(last.read_text()) if last.is_file() else {}), "finished": True, "stopped_by": None}
    if main:
        console.print(f"sft: {len(prepared.rows)} rows of {config.data.seq_len} per epoch, {rows_per_step} rows per step, "
                      f"{train.max_steps} steps (warmup {optim.warmup_steps}, lr {optim.lr:g} -> {optim.min_lr:g} "
                      f"{optim.schedule}); {describe_step_plan(config)}")
    trainer = Trainer(config, build_objective=build_sft_objective_factory(prepared), resume=resume, should_stop=should_stop,
                      evaluation=DuringTraining())
    summary = trainer.train()
    if main:
        write_sft_report(run_dir, prepared.report)
    return summary


def write_sft_report(run_dir: Path, report: dict) -> Path:
    """sft_report.md: the data check, chat evals before/after and the vibe test samples."""
    from smoltrain.post.chat.evals import vibe_markdown
    from smoltrain.post.chat.repl import chat_markdown

    def read(name: str) -> dict | None:
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    before, after = read(CHAT_BEFORE), read(CHAT_AFTER)
    parts = [f"# SFT report: {run_dir}", "", report_markdown(report)]
    if after:
        parts += ["## Chat evals", "", chat_markdown(after["chat"], before["chat"] if before else None), ""]
        parts += ["## Vibe test (after)", "", vibe_markdown(after["vibe"]), ""]
    if before:
        parts += ["## Vibe test (before: the init model)", "", vibe_markdown(before["vibe"]), ""]
    path = run_dir / "sft_report.md"
    write_atomic(path, "\n".join(parts))
    return path


__all__ = [
    "SFT_OPTIM",
    "SFTObjective",
    "build_sft_objective_factory",
    "describe_step_plan",
    "load_sft_config",
    "prepare_sft_data",
    "sft",
    "write_sft_report",
]
