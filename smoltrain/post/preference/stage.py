"""Preference training (`smoltrain dpo`): APO-zero, APO-down, DPO and IPO as an objective of the one Trainer loop.

A micro-batch holds chosen and rejected answers of its pairs as rows of one forward; log-probs are
summed over answer tokens. The reference is the init model, frozen: its log-probs are computed once,
before step 1, and stored in the run folder, so a resumed run reads them back instead of loading the
reference again (`dpo.precompute: false` keeps the reference in memory and runs it every step).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from smoltrain.config import Config, register_stage_config, require
from smoltrain.errors import ConfigError, DataError
from smoltrain.eval.during_training import DuringTraining
from smoltrain.eval.scoring import rate_with_error
from smoltrain.files import write_atomic
from smoltrain.model.transformer import token_logprobs
from smoltrain.post.preference.data import Pair, TextTokenizer, collate, summed_logprobs
from smoltrain.post.preference.losses import pair_losses, reward_metrics
from smoltrain.post.stage_eval import CHAT_AFTER, CHAT_BEFORE, evaluate_start, run_chat_evals, write_record
from smoltrain.train.distributed import autocast
from smoltrain.train.stage_config import load_stage_config, resolve_tokenizer

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.safetensors"
# SmolLM3's preference stage: used for every optim key the recipe does not set (lr ~10x below SFT's).
DPO_OPTIM = {"lr": 1e-6, "schedule": "cosine", "warmup_steps": 0, "weight_decay": 0.0}
MIN_LR_SHARE = 0.1


# ----------------------------------------------------------------------------- config


@dataclass
class DPOConfig:
    """Preference training (`smoltrain dpo`): losses in post/preference/losses.py, data in post/preference/data.py."""

    loss: Literal["apo_zero", "apo_down", "dpo", "ipo"] = "apo_zero"  # SmolLM3: APO-zero kept AIME25, DPO lost it
    beta: float = 0.1  # 0.05-0.1 in the playbook
    sft_weight: float = 0.0  # RPO: + weight x the chosen answer's NLL per token
    train_data: list[str] = field(default_factory=list)  # jsonl(.gz) or dataset folders of prompt / chosen / rejected rows
    eval_data: list[str] = field(default_factory=list)  # held-out pairs for preference accuracy
    split: Optional[str] = None  # of dataset folders in train_data (default: their only split, else train)
    eval_split: Optional[str] = None  # of dataset folders in eval_data (same default)
    holdout_pairs: int = 0  # without eval_data: hold out this many training pairs (a seeded draw)
    reference: Optional[str] = None  # reference model (default: train.init, the model training starts from)
    precompute: bool = True  # reference log-probs once before training, stored in the run folder
    max_length: int = 1024  # prompt + answer tokens (TRL's default); longer rows keep their start
    pairs_per_step: int = 64  # global batch in pairs (chosen + rejected rows: twice as many sequences)
    skip_bad: bool = False  # count and skip bad rows instead of stopping at the first
    chat_template: Optional[str] = None  # conversational rows: smollm3, chatml or model (default: the tokenizer's own)
    chat_eval_items: int = 0  # > 0: the chat evals (post/chat/evals.py) before training and at every evaluation


def validate_dpo(p: DPOConfig) -> None:
    require(p.beta > 0, f"dpo.beta must be positive, got {p.beta}")
    require(p.sft_weight >= 0, f"dpo.sft_weight must be >= 0, got {p.sft_weight}")
    require(p.max_length >= 2, f"dpo.max_length must be at least 2, got {p.max_length}")
    require(p.pairs_per_step > 0, f"dpo.pairs_per_step must be positive, got {p.pairs_per_step}")
    require(p.holdout_pairs >= 0, f"dpo.holdout_pairs must be >= 0, got {p.holdout_pairs}")
    require(p.chat_eval_items >= 0, f"dpo.chat_eval_items must be >= 0, got {p.chat_eval_items}")



@dataclass
class DPORunConfig(Config):
    """A run's config with the DPO section composed in; its batches are pairs, not tokens."""

    dpo: DPOConfig = field(default_factory=DPOConfig)

    token_batches = False  # a step is pairs_per_step pairs: data.seq_len and train.global_batch_tokens are not DPO's

    def validate_stage(self) -> None:
        validate_dpo(self.dpo)


register_stage_config("dpo", DPORunConfig)


def load_dpo_config(path: str | os.PathLike | dict | None, overrides: list[str] | None = None, init: str | None = None) -> Config:
    """The recipe through the one stage loader (train/stage_config.py), with DPO's optimizer defaults
    for the keys it leaves out (a step is dpo.pairs_per_step pairs: no token batch keys to derive)."""
    return load_stage_config(path, overrides or [], init, cls=DPORunConfig, optim_defaults=DPO_OPTIM,
                             min_lr_share=MIN_LR_SHARE)


# ----------------------------------------------------------------------------- batches


class PreferenceBatches:
    """Micro-batches of pairs for one data-parallel rank: a seeded permutation per epoch, the pairs of
    one global micro-batch round split over ranks (a remainder smaller than a round is dropped at the
    epoch's end). The position is in global pairs, so a checkpoint re-splits for another dp_world."""

    def __init__(self, pairs: list[Pair], micro_batch_size: int, dp_rank: int, dp_world: int, seed: int,
                 max_length: int, pad_id: int, reference: tuple[torch.Tensor, torch.Tensor] | None = None):
        if micro_batch_size * dp_world > len(pairs):
            raise ConfigError(f"train.micro_batch_size x data-parallel ranks ({micro_batch_size} x {dp_world}) "
                              f"exceeds the {len(pairs)} training pairs")
        self.pairs, self.micro, self.dp_rank, self.dp_world = pairs, micro_batch_size, dp_rank, dp_world
        self.seed, self.max_length, self.pad_id, self.reference = seed, max_length, pad_id, reference
        self.seq_len = max_length
        self.stage = -1  # no curriculum: the data section throughout
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _permutation(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order, self._order_epoch = torch.randperm(len(self.pairs), generator=g), self.epoch
        return self._order

    def _advance(self) -> torch.Tensor:
        per_round = self.micro * self.dp_world
        if self.position + per_round > len(self.pairs):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.dp_rank * self.micro
        indices = self._permutation()[start : start + self.micro]
        self.position += per_round
        return indices

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self._advance()
        batch = collate([self.pairs[i] for i in indices.tolist()], self.max_length, self.pad_id)
        batch["pair_index"] = indices
        if self.reference is not None:
            batch["ref_chosen"], batch["ref_rejected"] = self.reference[0][indices], self.reference[1][indices]
        return batch

    def skip(self, num_batches: int) -> None:
        for _ in range(num_batches):
            self._advance()

    def set_stage(self, index: int) -> None:
        self.stage = index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "pairs": len(self.pairs)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pairs") != len(self.pairs):
            raise DataError(f"the checkpoint was trained on {state.get('pairs')} preference pairs, the data now has "
                            f"{len(self.pairs)}: resume with the same dpo.train_data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- reference log-probs


@torch.no_grad()
def sequence_logprobs(model: nn.Module, pairs: list[Pair], batch_pairs: int, max_length: int, pad_id: int,
                      device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of every pair ([N] chosen, [N] rejected, float32) in batches of pairs."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_pairs):
        batch = collate(pairs[start : start + batch_pairs], max_length, pad_id)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast(device, precision):
            c, r = summed_logprobs(token_logprobs(model, ids, labels), labels)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def _fingerprint(reference: str, splits: dict[str, list[Pair]], max_length: int) -> str:
    h = hashlib.sha256(f"{Path(reference).resolve()}|{max_length}".encode())
    for name, pairs in splits.items():
        h.update(name.encode())
        for p in pairs:
            h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()


class _LazyTensors(Mapping):
    """The tensors of an open safetensors file, each read when asked: loading a sharded model from
    it holds one full tensor at a time, not the whole model (load_any reads every tensor, then copies)."""

    def __init__(self, file):
        self.file, self.names = file, list(file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def build_reference_model(reference: str, config: Config, ctx) -> nn.Module:
    """The frozen reference in the policy's layout (train/parallelize.py's recipe on ctx): under FSDP
    each rank keeps its shard of the weights, not a full copy (at 2 ranks half the bytes; LOG.md). A
    model folder is read tensor by tensor; other folders (runs, Hugging Face) whole, then sharded."""
    import dataclasses

    from safetensors import safe_open

    from smoltrain.train.load_model import CONFIG_FILE, WEIGHTS_FILE, model_config_of
    from smoltrain.train.parallelize import load_full_state_dict
    from smoltrain.train.trainer import build_training_model, load_init_weights

    model_section = config.model if reference == config.train.init else model_config_of(reference)
    # No backward through it, and no adapters on it (a LoRA policy's own reference is its base: reference_logps).
    train = dataclasses.replace(config.train, activation_checkpointing=False, lora=None)
    config = dataclasses.replace(config, model=model_section, train=train)
    model = build_training_model(config, ctx.device, ctx=ctx)
    folder = Path(reference)
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            load_full_state_dict(model, _LazyTensors(weights))
    else:
        load_init_weights(model, reference, config)
    if hasattr(model, "set_reshard_after_forward"):
        # FSDP2 keeps the root and the last block gathered after a forward, for the backward that
        # follows at once in training; the reference has none, so every block frees its gathered weights.
        model.set_reshard_after_forward(True)
    model.requires_grad_(False)
    return model


def _shared_logprobs(model: nn.Module, pairs: list[Pair], batch_pairs: int, max_length: int, pad_id: int, ctx,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every pair, each data-parallel rank computing a strided share. A sharded
    model's forward gathers weights from every rank, so all ranks run the same number of batches
    (short shares are padded with pair 0, whose result is dropped); a sum over ranks assembles it,
    counted once per tensor-parallel group."""
    rank, world = ctx.dp_rank, ctx.dp_world
    mine = list(range(rank, len(pairs), world))
    padded = mine + [0] * (math.ceil(len(pairs) / world) - len(mine))
    c, r = sequence_logprobs(model, [pairs[i] for i in padded], batch_pairs, max_length, pad_id, ctx.device, precision)
    both = torch.zeros(2, len(pairs), dtype=torch.float32)
    if ctx.tp_rank == 0:
        both[0, mine], both[1, mine] = c[: len(mine)], r[: len(mine)]
    if ctx.world_size > 1:
        both = both.to(ctx.device)
        dist.all_reduce(both)
        both = both.cpu()
    return both[0].clone(), both[1].clone()


def reference_logps(reference: str, splits: dict[str, list[Pair]], run_dir: Path, batch_pairs: int, max_length: int,
                    pad_id: int, ctx, precision: str, config: Config,
                    base: nn.Module | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The reference's summed log-probs of every split, read from run_dir when a pass for the same
    reference and data is stored there, else computed by the reference in the policy's layout
    (pairs split over the data-parallel ranks) and stored. base: a LoRA policy whose frozen base is
    the reference, scored with its adapters off (no second model)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run_dir / REFERENCE_FILE
    fingerprint = _fingerprint(reference, splits, max_length)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
            if stored == fingerprint:
                log.info("reference log-probs: reusing %s", path)
                return {name: (f.get_tensor(f"{name}.chosen"), f.get_tensor(f"{name}.rejected")) for name in splits}
        raise DataError(f"{path}: stored for another reference model or other preference data; "
                        "resume with the same dpo section, or delete it to recompute")

    start = time.perf_counter()
    if base is not None:
        from smoltrain.train.lora import adapters_disabled

        with adapters_disabled(base):
            result = {name: _shared_logprobs(base, pairs, batch_pairs, max_length, pad_id, ctx, precision)
                      for name, pairs in splits.items()}
    else:
        model = build_reference_model(reference, config, ctx)
        result = {name: _shared_logprobs(model, pairs, batch_pairs, max_length, pad_id, ctx, precision)
                  for name, pairs in splits.items()}
        del model
    if ctx.is_main:
        tensors = {f"{name}.{side}": t.contiguous() for name, pair in result.items() for side, t in zip(("chosen", "rejected"), pair)}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint,
                                                                                  "reference": str(reference)}))
    if ctx.world_size > 1:
        dist.barrier()
    log.info("reference log-probs of %s pairs in %.1fs -> %s", sum(len(p) for p in splits.values()),
             time.perf_counter() - start, path)
    return result


# ----------------------------------------------------------------------------- the objective


class DPOObjective:
    """Preference loss (dpo.loss) of each pair, summed; the Trainer divides by the step's pair count."""

    name = "dpo"

    def __init__(self, config: Config, batches: PreferenceBatches, eval_pairs: list[Pair],
                 eval_reference: tuple[torch.Tensor, torch.Tensor] | None, reference_model: nn.Module | None,
                 pad_id: int, device: torch.device, precision: str, chat=None, run_dir: Path | None = None,
                 is_main: bool = True, base_reference: bool = False):
        self.config, self.batches = config, batches
        self.eval_pairs, self.eval_reference = eval_pairs, eval_reference
        self.reference_model = reference_model  # live reference (dpo.precompute: false), else None
        # LoRA: the live reference is the policy itself with its adapters off (its frozen base)
        self.base_reference = base_reference
        self.pad_id, self.device, self.precision = pad_id, device, precision
        self.chat, self.run_dir, self.is_main = chat, run_dir, is_main  # chat: a chat tokenizer, for chat evals

    def _live_reference(self, model: nn.Module):
        """(the reference model, the context to score it in): the base of a LoRA policy, or the loaded one."""
        from smoltrain.train.lora import adapters_disabled

        if self.base_reference:
            return model, adapters_disabled(model)
        return self.reference_model, contextlib.nullcontext()

    def _reference(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is None and not self.base_reference:
            return batch["ref_chosen"], batch["ref_rejected"]
        reference, context = self._live_reference(model)
        with torch.no_grad(), context:
            return summed_logprobs(token_logprobs(reference, batch["input_ids"], batch["labels"]), batch["labels"])

    def loss(self, model: nn.Module, batch):
        p = self.config.dpo
        labels = batch["labels"]
        chosen, rejected = summed_logprobs(token_logprobs(model, batch["input_ids"], labels), labels)
        ref_chosen, ref_rejected = self._reference(model, batch)
        chosen_tokens, rejected_tokens = batch["completion_tokens"].chunk(2)
        losses = pair_losses(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                             p.loss, p.beta, p.sft_weight)
        return losses.sum(), losses.numel(), reward_metrics(chosen, rejected, ref_chosen, ref_rejected, p.beta)

    def accumulation(self, seq_len: int, dp_world: int) -> int:
        per_round = self.config.train.micro_batch_size * dp_world
        if self.config.dpo.pairs_per_step % per_round:
            raise ConfigError(f"dpo.pairs_per_step ({self.config.dpo.pairs_per_step}) must be a multiple of "
                              f"train.micro_batch_size x data-parallel ranks ({self.config.train.micro_batch_size} x {dp_world})")
        return self.config.dpo.pairs_per_step // per_round

    def describe_step(self, seq_len: int, dp_world: int) -> str:
        accumulation = self.accumulation(seq_len, dp_world)
        return (f"{self.config.dpo.pairs_per_step} pairs = {self.config.train.micro_batch_size} x {accumulation} "
                f"accumulation x {dp_world} data-parallel")

    def stateful(self) -> dict:
        return {}  # the position is the batch source's; the reference pass is a file in the run folder

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, model: nn.Module) -> dict:
        """Held-out preference accuracy (chosen reward > rejected reward), margin and loss, with the
        accuracy's standard error, and the chat evals when dpo.chat_eval_items > 0. Every rank scores
        every held-out pair (the forward may have collectives)."""
        if not self.eval_pairs:
            return self._chat_evals(model) if self.chat is not None else {}
        p = self.config.dpo
        micro = self.config.train.micro_batch_size
        chosen, rejected = sequence_logprobs(model, self.eval_pairs, micro, p.max_length, self.pad_id, self.device, self.precision)
        if self.reference_model is not None or self.base_reference:
            reference, context = self._live_reference(model)
            with context:
                ref = sequence_logprobs(reference, self.eval_pairs, micro, p.max_length, self.pad_id, self.device, self.precision)
        else:
            ref = self.eval_reference
        lengths = [collate([pair], p.max_length, self.pad_id)["completion_tokens"] for pair in self.eval_pairs]
        chosen_tokens = torch.stack([n[0] for n in lengths])
        rejected_tokens = torch.stack([n[1] for n in lengths])
        losses = pair_losses(chosen, rejected, ref[0], ref[1], chosen_tokens, rejected_tokens, p.loss, p.beta, p.sft_weight)
        metrics = {k: float(s) / n for k, (s, n) in reward_metrics(chosen, rejected, ref[0], ref[1], p.beta).items()}
        n = len(self.eval_pairs)
        accuracy = metrics["rewards/accuracies"]
        result = {"preference": {
            "accuracy": accuracy, "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / max(1, n - 1)),
            "margin": metrics["rewards/margins"], "chosen_reward": metrics["rewards/chosen"],
            "rejected_reward": metrics["rewards/rejected"], "loss": float(losses.mean()), "pairs": n,
        }}
        if self.chat is not None:
            result.update(self._chat_evals(model))
        return result

    def _chat_evals(self, model: nn.Module) -> dict:
        """The chat evals when dpo.chat_eval_items > 0, with the vibe test in chat_after.json."""
        record = run_chat_evals(model, self.chat, self.config.dpo.chat_eval_items, vibe=True)
        if self.is_main and self.run_dir:
            write_record(self.run_dir / CHAT_AFTER, record)
        return {"chat": record["chat"]}


# ----------------------------------------------------------------------------- building it


def split_data(config: Config, tokenizer_path: str) -> tuple:
    """(train pairs, held-out pairs), prepared once on disk (post/preference/prepare.py) and read from
    there: the held-out ones are dpo.eval_data, else a seeded draw of dpo.holdout_pairs training pairs."""
    from smoltrain.post.preference.prepare import PairSubset, load_pairs

    p = config.dpo
    if not p.train_data:
        raise ConfigError("dpo.train_data is empty: name one or more jsonl files of prompt / chosen / rejected rows")
    pairs = load_pairs(p.train_data, tokenizer_path, p.chat_template, p.max_length, p.skip_bad, config.data.cache_dir, p.split)
    if pairs.skipped:
        log.warning("dpo.train_data: skipped %s bad rows (%s)", sum(pairs.skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(pairs.skipped.items())))
    if p.eval_data:
        return pairs, load_pairs(p.eval_data, tokenizer_path, p.chat_template, p.max_length, p.skip_bad, config.data.cache_dir,
                                 p.eval_split)
    if p.holdout_pairs:
        if p.holdout_pairs >= len(pairs):
            raise ConfigError(f"dpo.holdout_pairs ({p.holdout_pairs}) leaves none of the {len(pairs)} pairs to train on")
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.train.seed)).numpy()
        kept = np.ones(len(pairs), dtype=bool)
        kept[order[: p.holdout_pairs]] = False
        return PairSubset(pairs, np.flatnonzero(kept)), PairSubset(pairs, np.sort(order[: p.holdout_pairs]))
    return pairs, []


def reference_of(config: Config) -> str:
    reference = config.dpo.reference or config.train.init
    if not reference:
        raise ConfigError("dpo needs a starting model: set train.init (the SFT model; also the reference) or dpo.reference")
    return reference


def build_dpo_objective(config: Config, model: nn.Module, ctx, run_dir: Path) -> DPOObjective:
    """Data for this rank, and the reference: its stored pass, a new pass, or (precompute: false) the
    model itself, loaded once and frozen."""
    p = config.dpo
    reference = reference_of(config)
    path = resolve_tokenizer(config, reference)
    tokenizer = TextTokenizer.load(path)
    train_pairs, eval_pairs = split_data(config, path)
    pad_id = tokenizer.eos_id
    precision = getattr(ctx, "precision", "fp32")  # resolved train.precision (bf16 autocast or fp32)
    micro = config.train.micro_batch_size
    reference_model, train_ref, eval_ref = None, None, None
    # LoRA from the reference itself: the policy's frozen base is the reference, scored with its
    # adapters off; no second model is loaded.
    base_reference = config.train.lora is not None and reference == config.train.init
    if p.precompute:
        splits = {"train": train_pairs, "eval": eval_pairs} if eval_pairs else {"train": train_pairs}
        stored = reference_logps(reference, splits, Path(run_dir), micro, p.max_length, pad_id, ctx, precision, config,
                                 base=model if base_reference else None)
        train_ref, eval_ref = stored["train"], stored.get("eval")
    elif not base_reference:
        reference_model = build_reference_model(reference, config, ctx)
    batches = PreferenceBatches(train_pairs, micro, ctx.dp_rank, ctx.dp_world, config.train.seed, p.max_length,
                                pad_id, train_ref)
    chat = None
    if p.chat_eval_items:
        from smoltrain.post.chat.template import load_chat_tokenizer

        chat = load_chat_tokenizer(path, p.chat_template)
    objective = DPOObjective(config, batches, eval_pairs, eval_ref, reference_model, pad_id, ctx.device, precision,
                             chat, Path(run_dir), ctx.is_main, base_reference=base_reference and not p.precompute)
    objective.accumulation(p.max_length, ctx.dp_world)  # a bad batch split fails now, not at step 1
    if chat is not None:  # the init model, before any step (the Trainer built it from train.init): the "before" column
        evaluate_start(Path(run_dir), CHAT_BEFORE, lambda: run_chat_evals(model, chat, p.chat_eval_items, vibe=True),
                       config.train.init, ctx.is_main)
    return objective


def run(config: Config, resume: str | None = None, should_stop=None) -> dict:
    """`smoltrain dpo`: preference training from train.init, in the one Trainer loop (`load_dpo_config`
    reads a recipe the way the command does)."""
    from smoltrain.train.trainer import Trainer

    reference_of(config)  # one-line errors before anything is allocated
    if not config.dpo.train_data:
        raise ConfigError("dpo.train_data is empty: name one or more jsonl files of prompt / chosen / rejected rows")
    summary = Trainer(config, build_dpo_objective, resume=resume, should_stop=should_stop, evaluation=DuringTraining()).train()
    if int(os.environ.get("RANK", "0")) == 0:  # train() has ended the process group: ask torchrun's variable
        report = write_report(Path(config.train.out_dir))
        if report is not None:
            print(report.read_text(), end="")
    return summary


def _cell(values: dict, name: str) -> str:
    value, stderr = values.get(name), values.get(f"{name}_stderr")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None and not math.isnan(stderr) else "")


def write_report(run_dir: Path) -> Path | None:
    """dpo_report.md: held-out preference accuracy at the first and last evaluation, and the chat
    evals of the init model and of the last evaluation, side by side with standard errors."""
    import json

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    evals = [m for m in map(json.loads, metrics.read_text().splitlines()) if "eval" in m]
    preference = [(m["step"], m["eval"]["preference"]) for m in evals if "preference" in m["eval"]]
    lines = []
    if preference:
        lines += ["| held-out pairs | step | accuracy | margin | loss |", "|---|---|---|---|---|"]
        for step, v in [preference[0], preference[-1]] if len(preference) > 1 else preference:
            accuracy = rate_with_error(v["accuracy"], v["accuracy_stderr"], v["pairs"])
            lines.append(f"| {v['pairs']} | {step} | {accuracy} | {v['margin']:+.3f} | {v['loss']:.4f} |")
    before, after = run_dir / CHAT_BEFORE, run_dir / CHAT_AFTER
    if before.is_file() and after.is_file():
        b, a = json.loads(before.read_text())["chat"], json.loads(after.read_text())["chat"]
        lines += ["", "| chat eval | before (init) | after |", "|---|---|---|"]
        for name in ("no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate",
                     "no_think_length", "think_length"):
            lines.append(f"| {name} | {_cell(b, name)} | {_cell(a, name)} |")
    if not lines:
        return None
    return write_atomic(run_dir / "dpo_report.md", f"# Preference training: {run_dir}\n\n" + "\n".join(lines) + "\n")


__all__ = ["load_dpo_config", "DPOObjective", "PreferenceBatches", "build_dpo_objective", "build_reference_model", "reference_logps",
           "sequence_logprobs", "run", "REFERENCE_FILE"]
