"""`smoltrain grpo`: GRPO with verifiable rewards as an objective of the one Trainer loop.

The batch source is the rollout machine: every `num_iterations` optimizer steps it samples G
completions for each of the step's prompts with the current weights, scores them, turns rewards into
group advantages and serves the same micro-batches mu times (stored old log-probs when mu > 1).
Sampling uses one generator per completion seeded by (train.seed, rollout batch, completion index):
the random stream is a function of the saved rollout counter, so a resumed run, and a run split over
any number of data-parallel ranks, draws exactly what one uninterrupted process draws.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from smoltrain.config import Config, register_stage_config, require
from smoltrain.data.readers import is_dataset_folder
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.eval.answers import is_correct
from smoltrain.eval.during_training import DuringTraining
from smoltrain.eval.scoring import rate_with_error
from smoltrain.model.generate import sample
from smoltrain.model.modes import evaluating
from smoltrain.post.chat.template import END_OF_TURN_TOKENS
from smoltrain.post.rl.grpo import aggregate, group_advantages, per_token_loss
from smoltrain.post.rl.prompts import encode, load_prompts, reward_columns
from smoltrain.post.rl.rewards import RewardState, build_rewards, score
from smoltrain.post.rl.rollout import completion_logprobs, generate_rollouts, max_over_ranks, micro_batches
from smoltrain.post.stage_eval import evaluate_start, run_chat_evals
from smoltrain.train.stage_config import load_stage_config, resolve_tokenizer

# ----------------------------------------------------------------------------- config


@dataclass
class GRPOConfig:
    """RL with verifiable rewards (`smoltrain grpo`); defaults are TRL 1.16's where it has one."""

    prompts: str = "embedded"  # "embedded" (arithmetic problems), "gsm8k:PATH", a jsonl/json/parquet file or a dataset folder
    eval_prompts: Optional[str] = None  # held-out prompts: default the held-out split of `prompts` (a file needs one)
    split: Optional[str] = None  # of a dataset folder in prompts (default: its only split, else train)
    eval_split: Optional[str] = None  # of eval_prompts' dataset folder, or of prompts' when eval_prompts is unset
    num_prompts: int = 2000  # training prompts drawn from the source (the embedded source generates this many)
    eval_count: int = 64  # held-out prompts scored every train.eval_every steps
    mode: Literal["think", "no_think"] = "no_think"  # unless a prompt row sets its own
    chat_template: Optional[str] = None  # smollm3 / chatml; None: the tokenizer's own template
    num_generations: int = 8  # G: completions per prompt
    prompts_per_step: int = 8  # prompts per rollout batch (split over data-parallel ranks)
    max_prompt_length: int = 512  # longer prompts keep their end (TRL)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_iterations: int = 1  # mu: optimizer steps on each rollout batch (> 1 stores old log-probs)
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: epsilon (DAPO: 0.28)
    beta: float = 0.0  # k3 KL to the frozen starting model; 0 keeps no reference (TRL, DAPO)
    kl_bias_correction: bool = True  # TRL: the KL term weighted by the probability ratio
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on completions without an end token
    rewards: dict[str, float] = field(default_factory=lambda: {"math_answer": 1.0})  # name or module:function -> weight
    overlong_max_len: int = 0  # DAPO soft overlong penalty (reward "overlong"): -1 at this many tokens
    overlong_cache: int = 0  # ... and 0 up to overlong_max_len - overlong_cache
    pass_k: int = 4  # held-out pass@k samples per prompt (pass@1 is greedy)
    chat_evals: bool = False  # also the SFT chat evals (accuracy in both modes, adherence, format) at each eval


def validate_grpo(g: GRPOConfig) -> None:
    for key in ("num_prompts", "eval_count", "prompts_per_step", "max_prompt_length", "max_completion_length",
                "num_iterations", "pass_k"):
        require(getattr(g, key) > 0, f"grpo.{key} must be positive, got {getattr(g, key)}")
    require(g.num_generations >= 2, f"grpo.num_generations must be >= 2 (a group needs a spread), got {g.num_generations}")
    require(g.temperature > 0, f"grpo.temperature must be positive (GRPO samples), got {g.temperature}")
    require(0 < g.top_p <= 1, f"grpo.top_p must lie in (0, 1], got {g.top_p}")
    require(g.top_k >= 0, f"grpo.top_k must be >= 0, got {g.top_k}")
    require(0 <= g.epsilon < 1, f"grpo.epsilon must lie in [0, 1), got {g.epsilon}")
    require(g.epsilon_high is None or g.epsilon_high >= 0, f"grpo.epsilon_high must be >= 0, got {g.epsilon_high}")
    require(g.beta >= 0, f"grpo.beta must be >= 0, got {g.beta}")
    if "overlong" in g.rewards:
        require(0 < g.overlong_cache <= g.overlong_max_len,
                 f"grpo.overlong_cache ({g.overlong_cache}) must lie in (0, grpo.overlong_max_len ({g.overlong_max_len})]")



@dataclass
class GRPORunConfig(Config):
    """A run's config with the GRPO section composed in; its batches are rollouts, not tokens."""

    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    token_batches = False  # a step is prompts_per_step x num_generations rollouts: no token batch keys

    def validate_stage(self) -> None:
        validate_grpo(self.grpo)


register_stage_config("grpo", GRPORunConfig)



def _row_seed(*parts) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generators(*parts, count: int, start: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_row_seed(*parts, start + i)) for i in range(count)]


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]) if ordered else 0.0


class RolloutBuffer:
    """The micro-batches of the current rollout batch: a stateful part, so a run resumed between two
    of its mu optimizer steps trains on the very same rollouts."""

    def __init__(self):
        self.batches: list[dict] | None = None
        self.metrics: dict = {}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.metrics = state["batches"], state["metrics"]


class RolloutSource:
    """BatchSource for GRPO (train/objective.py): its position is two integers, the rollout batches
    made and the micro-batches served."""

    stage = -1  # data/stages.py: -1 is the data section itself, before any curriculum stage

    def __init__(self, objective: GRPOObjective):
        self.objective = objective
        self.seq_len = objective.config.grpo.max_prompt_length + objective.config.grpo.max_completion_length
        self.rollouts = 0
        self.position = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        o = self.objective
        per_step = o.accumulation(self.seq_len, o.ctx.dp_world)
        cycle = per_step * o.config.grpo.num_iterations
        if self.position % cycle == 0:
            o.make_rollouts(self.rollouts)
            self.rollouts += 1
        elif o.buffer.batches is None:
            raise CheckpointError("the checkpoint has no rollout buffer for its position inside a rollout batch")
        batch = o.buffer.batches[(self.position % cycle) % per_step]
        self.position += 1
        o.fetched = time.perf_counter()
        return batch

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts, self.position = int(state["rollouts"]), int(state["position"])

    def skip(self, num_batches: int) -> None:
        for _ in range(num_batches):  # skipping rollouts means making them: they draw from the counter
            self.next_batch()

    def set_stage(self, index: int) -> None:
        if index != -1:
            raise ConfigError("grpo has one stage: data.stages do not apply")

    def close(self) -> None:
        pass


class GRPOObjective:
    name = "grpo"
    batch_phase = "rollouts"  # next_batch generates: the Trainer logs time/rollouts_s, not a data wait

    def __init__(self, config: Config, model: nn.Module, ctx, tokenizer, train_prompts: list[dict],
                 eval_prompts: list[dict], reference: nn.Module | None = None):
        g = config.grpo
        self.config, self.model, self.ctx, self.tokenizer = config, model, ctx, tokenizer
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.reference = reference
        self.rewards = build_rewards(g.rewards, g.num_generations, g.mode, g.overlong_max_len, g.overlong_cache)
        self.stop_tokens = _stop_tokens(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lockstep = max_over_ranks(device=ctx.device) if ctx.world_size > 1 else None
        self.buffer = RolloutBuffer()
        self.batches = RolloutSource(self)
        self.fetched = time.perf_counter()
        self._encoded: dict[int, list[int]] = {}
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its prompt order): a function of the seed
        if g.prompts_per_step % ctx.dp_world:
            raise ConfigError(f"grpo.prompts_per_step ({g.prompts_per_step}) must be a multiple of the "
                              f"data-parallel ranks ({ctx.dp_world}): each group stays on one rank")
        if len(eval_prompts) < ctx.dp_world:
            raise ConfigError(f"grpo.eval_count ({len(eval_prompts)}) must be at least the data-parallel ranks ({ctx.dp_world})")

    # ------------------------------------------------------------------------- the contract

    def accumulation(self, seq_len: int, dp_world: int) -> int:
        g = self.config.grpo
        rows = g.prompts_per_step // dp_world * g.num_generations
        return -(-rows // self.config.train.micro_batch_size)

    def describe_step(self, seq_len: int, dp_world: int) -> str:
        g = self.config.grpo
        return (f"{g.prompts_per_step} prompts x {g.num_generations} generations = {g.prompts_per_step * g.num_generations} "
                f"rollouts ({self.accumulation(seq_len, dp_world)} micro-batches of at most "
                f"{self.config.train.micro_batch_size} per rank x {dp_world} data-parallel)")

    def stateful(self) -> dict:
        return {"rollout_buffer": self.buffer}

    def loss(self, model: nn.Module, batch):
        g = self.config.grpo
        logprobs = completion_logprobs(model, batch, g.temperature)
        per_token, parts = per_token_loss(logprobs, batch["advantages"], batch.get("old_logprobs"), g.epsilon,
                                          g.epsilon_high, g.beta, batch.get("ref_logprobs"), g.kl_bias_correction)
        mask = batch["loss_mask"]
        total, count = aggregate(per_token, mask, g.loss_type, g.max_completion_length)
        m = mask.float()
        tokens = m.sum()
        low, high = parts["low_clipped"].float() * m, parts["high_clipped"].float() * m
        metrics = {"clip_ratio/low_mean": (low.sum(), tokens), "clip_ratio/high_mean": (high.sum(), tokens),
                   "clip_ratio/region_mean": (low.sum() + high.sum(), tokens)}
        if "kl" in parts:
            metrics["kl"] = ((parts["kl"] * m).sum(), tokens)
        return total, count, metrics

    def step_metrics(self) -> dict:
        """The latest rollout batch's numbers (global), and training tokens/s measured apart from sampling."""
        metrics = dict(self.buffer.metrics)
        seconds = time.perf_counter() - self.fetched
        if self.buffer.batches and seconds > 0:
            label_tokens = sum(int((b["labels"] != -100).sum()) for b in self.buffer.batches)
            metrics["train_tokens_per_s"] = round(label_tokens * self.ctx.dp_world / seconds, 1)
        return metrics

    # ------------------------------------------------------------------------- rollouts

    def _prompt_ids(self, index: int, item: dict) -> list[int]:
        if index not in self._encoded:
            ids = encode(self.tokenizer, item)
            self._encoded[index] = ids[-self.config.grpo.max_prompt_length :]  # TRL keeps the end
        return self._encoded[index]

    def _step_prompts(self, k: int) -> list[int]:
        """Indices of rollout batch k's prompts: consecutive slices of per-epoch shuffles of the set."""
        n, per = len(self.train_prompts), self.config.grpo.prompts_per_step
        out = []
        for position in range(k * per, (k + 1) * per):
            epoch, offset = divmod(position, n)
            if self._order[0] != epoch:
                order = list(range(n))
                random.Random(_row_seed(self.config.train.seed, "prompts", epoch)).shuffle(order)
                self._order = (epoch, order)
            out.append(self._order[1][offset])
        return out

    def _gather(self, value: torch.Tensor) -> torch.Tensor:
        """[n] local values -> [n x dp_world] in rank order (every rank holds as many)."""
        if self.ctx.dp_world == 1:
            return value
        import torch.distributed as dist

        value = value.to(self.ctx.device).contiguous()
        parts = [torch.empty_like(value) for _ in range(self.ctx.dp_world)]
        dist.all_gather(parts, value, group=self.ctx.flat_dp_mesh.get_group())
        return torch.cat(parts).cpu()

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        with self.ctx.autocast():  # the precision the Trainer's forwards use: ratios start at exactly 1
            on_device = {key: value.to(self.ctx.device) for key, value in batch.items()}
            return completion_logprobs(model, on_device, self.config.grpo.temperature).float().cpu()

    def _reference_logprobs(self, batch: dict) -> torch.Tensor:
        """The frozen starting policy's log-probs: a LoRA policy's own base (adapters off), else the reference model."""
        if self.reference is not None:
            return self._logprobs(self.reference, batch)
        from smoltrain.train.lora import adapters_disabled

        with adapters_disabled(self.model):
            return self._logprobs(self.model, batch)

    def make_rollouts(self, k: int) -> None:
        g, ctx = self.config.grpo, self.ctx
        indices = self._step_prompts(k)
        local_count = g.prompts_per_step // ctx.dp_world
        first = ctx.dp_rank * local_count
        mine = indices[first : first + local_count]
        items = [self.train_prompts[i] for i in mine]
        prompt_ids = [self._prompt_ids(i, item) for i, item in zip(mine, items)]
        generators = _generators(self.config.train.seed, "rollout", k, count=local_count * g.num_generations,
                                 start=first * g.num_generations)
        rollouts = generate_rollouts(self.model, prompt_ids, g.num_generations, g.max_completion_length, g.temperature,
                                     g.top_k or None, g.top_p, self.stop_tokens, generators, self.lockstep)
        texts = [self._decode(ids, truncated) for ids, truncated in zip(rollouts.completion_ids, rollouts.truncated)]
        prompts = [item.get("messages", item.get("prompt")) for item in items for _ in range(g.num_generations)]
        columns = reward_columns(items, g.num_generations)
        state = RewardState(global_step=k * g.num_iterations, max_steps=self.config.train.max_steps)
        scores = score(self.rewards, prompts, texts, rollouts.completion_ids, columns, state)
        correct = [float(is_correct(t, a)) for t, a in zip(texts, columns["answer"])]

        # Everything the advantages and the metrics need, gathered in rank order (= one process's order).
        per_function = torch.tensor([[math.nan if v is None else v for v in values] for values in scores.per_function.values()],
                                    dtype=torch.float64).reshape(len(scores.per_function), -1)
        local = torch.cat([scores.total[None], scores.scorable.double()[None], per_function,
                           torch.tensor([[len(c) for c in rollouts.completion_ids], rollouts.truncated, correct],
                                        dtype=torch.float64),
                           torch.tensor([[sum(e) for e in rollouts.entropies]], dtype=torch.float64)])
        gathered = torch.stack([self._gather(row) for row in local])
        total, scorable = gathered[0], gathered[1].bool()
        functions = gathered[2 : 2 + len(scores.per_function)]
        lengths, truncated, correct_all, entropy = gathered[-4:]
        advantages = group_advantages(total, g.num_generations, g.scale_rewards, scorable)
        rows = local_count * g.num_generations
        mine_adv = advantages[ctx.dp_rank * rows : (ctx.dp_rank + 1) * rows]

        batches = micro_batches(rollouts, mine_adv, self.config.train.micro_batch_size, g.mask_truncated, self.pad_id)
        if g.num_iterations > 1:  # the policy that sampled, for the ratio of iterations 2..mu
            for batch in batches:
                batch["old_logprobs"] = self._logprobs(self.model, batch)
        if g.beta > 0:
            for batch in batches:
                batch["ref_logprobs"] = self._reference_logprobs(batch)
        for batch in batches:
            del batch["sampling_logprobs"]  # kept in tests; the loss recomputes through the forward
        self.buffer.batches = batches

        seconds = torch.tensor([rollouts.seconds])
        if ctx.dp_world > 1:
            seconds = self._gather(seconds).max()[None]
        lengths_list = [int(x) for x in lengths.tolist()]
        spread = total.view(-1, g.num_generations).std(dim=1)
        scored = total[scorable]
        metrics = {  # TRL's names; reward and reward_std over the scorable completions of the whole batch
            "reward": scored.mean().item() if scored.numel() else None,
            "reward_std": scored.std().item() if scored.numel() > 1 else None,
            "frac_reward_zero_std": (spread < 1e-8).double().mean().item(),
            "accuracy": correct_all.mean().item(),
            "completions/mean_length": statistics.fmean(lengths_list),
            "completions/median_length": float(statistics.median(lengths_list)),
            "completions/p90_length": _percentile(lengths_list, 0.9),
            "completions/max_length": float(max(lengths_list)),
            "completions/clipped_ratio": truncated.mean().item(),  # TRL's name for the truncated share
            "unscorable": int((~scorable).sum().item()),
            "entropy": (entropy.sum() / max(1, sum(lengths_list))).item(),
            "rollout_tokens_per_s": round(sum(lengths_list) / max(seconds.item(), 1e-9), 1),
            "rollouts": k + 1,
        }
        for name, values in zip(scores.per_function, functions):
            scored = values[~values.isnan()]
            metrics[f"rewards/{name}/mean"] = scored.mean().item() if scored.numel() else None
            metrics[f"rewards/{name}/std"] = scored.std().item() if scored.numel() > 1 else None
        self.buffer.metrics = {k_: (round(v, 6) if isinstance(v, float) else v) for k_, v in metrics.items()}

    def _decode(self, ids: list[int], truncated: bool) -> str:
        body = ids if truncated else ids[:-1]  # the end token is trained on, not part of the answer text
        return self.tokenizer.decode(body, skip_special_tokens=False)

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """pass@1 (greedy) and pass@k (k samples at the training temperature, the same seeds at every
        evaluation) on the held-out prompts, split over data-parallel ranks; with their standard errors."""
        g, ctx = self.config.grpo, self.ctx
        mine = list(range(ctx.dp_rank, len(self.eval_prompts), ctx.dp_world))
        items = [self.eval_prompts[i] for i in mine]
        ids = [encode(self.tokenizer, item)[-g.max_prompt_length :] for item in items]
        with evaluating(model):
            greedy = sample(model, ids, g.max_completion_length, 0.0, None, None, self.stop_tokens, lockstep=self.lockstep)
        generators = [torch.Generator().manual_seed(_row_seed(self.config.train.seed, "eval", i, j))
                      for i in mine for j in range(g.pass_k)]
        sampled = generate_rollouts(model, ids, g.pass_k, g.max_completion_length, g.temperature, g.top_k or None,
                                    g.top_p, self.stop_tokens, generators, self.lockstep)
        pass1 = [is_correct(self._decode(t, not f), item["answer"])
                 for t, f, item in zip(greedy.tokens, greedy.finished, items)]
        draws = [is_correct(self._decode(t, trunc), items[n // g.pass_k]["answer"])
                 for n, (t, trunc) in enumerate(zip(sampled.completion_ids, sampled.truncated))]
        passk = [any(draws[i * g.pass_k : (i + 1) * g.pass_k]) for i in range(len(items))]
        sums = torch.tensor([sum(pass1), sum(passk), sum(draws), sum(len(t) for t in greedy.tokens),
                             sum(not f for f in greedy.finished), len(items)], dtype=torch.float64, device=ctx.device)
        sums = ctx.all_reduce_dp(sums, op="sum").cpu().tolist() if ctx.dp_world > 1 else sums.cpu().tolist()
        n = sums[5]
        p1, pk = sums[0] / n, sums[1] / n
        # every rank runs the same greedy chats: FSDP ranks must run the same forwards
        chat = run_chat_evals(model, self.tokenizer, seed=self.config.train.seed) if g.chat_evals else {}
        # pass@1 is greedy; with pass_k 1 the one sample's rate is mean@1 (a pass@1 key for it would
        # overwrite the greedy one, as it once did)
        sampled = {f"pass@{g.pass_k}": round(pk, 4)} if g.pass_k > 1 else {}
        return {**chat, "grpo": {"pass@1": round(p1, 4), "pass@1_stderr": round(math.sqrt(p1 * (1 - p1) / n), 4),
                **sampled, f"mean@{g.pass_k}": round(sums[2] / (n * g.pass_k), 4),
                "greedy_mean_length": round(sums[3] / n, 2), "greedy_truncated": round(sums[4] / n, 4),
                "n": int(n), "sampled_at_temperature": g.temperature}}


def _stop_tokens(tokenizer) -> list[int]:
    """End of turn (chat prompts) and end of sequence (text prompts), whichever the tokenizer has."""
    stops = set()
    for token in (*END_OF_TURN_TOKENS, tokenizer.eos_token):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    if not stops:
        raise ConfigError("the tokenizer has no end-of-turn nor end-of-sequence token: completions could never stop")
    return sorted(stops)


def load_grpo_config(path: str | os.PathLike | dict | None, overrides: list[str] | None = None, init: str | None = None) -> Config:
    """The recipe through the one stage loader (train/stage_config.py); GRPO keeps the recipe's optimizer keys."""
    return load_stage_config(path, overrides or [], init, cls=GRPORunConfig)


def load_grpo_prompts(config: Config) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompts; a file source needs grpo.eval_prompts (a dataset folder: them or grpo.eval_split)."""
    g = config.grpo
    train = load_prompts(g.prompts, "train", g.mode, g.num_prompts, config.train.seed, g.split)
    if g.eval_prompts:
        heldout = load_prompts(g.eval_prompts, "heldout", g.mode, g.eval_count, config.train.seed, g.eval_split)
    elif g.prompts == "embedded" or g.prompts.startswith("gsm8k:"):
        heldout = load_prompts(g.prompts, "heldout", g.mode, g.eval_count, config.train.seed)
    elif g.eval_split and is_dataset_folder(Path(g.prompts)):
        heldout = load_prompts(g.prompts, "heldout", g.mode, g.eval_count, config.train.seed, g.eval_split)
    else:
        raise ConfigError(f"grpo.prompts is a file ({g.prompts}): set grpo.eval_prompts to held-out prompts "
                          "(or, for a dataset folder, grpo.eval_split to its held-out split)")
    return train, heldout


BEFORE = "eval_before.json"  # the held-out evaluation of the starting model, in the run folder


def build_grpo_objective(config: Config, model: nn.Module, ctx, run_dir: Path) -> GRPOObjective:
    """The factory the Trainer calls after building the model (at its starting weights); a fresh run
    from train.init first scores the starting model on the held-out prompts (eval_before.json)."""
    from smoltrain.post.chat.template import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(resolve_tokenizer(config), config.grpo.chat_template)
    train, heldout = load_grpo_prompts(config)
    reference = None
    # The frozen starting policy, also on resume (built from train.init, not the checkpoint); with LoRA
    # the policy's own base, its adapters off (no second model).
    if config.grpo.beta > 0 and config.train.lora is None:
        from smoltrain.train.trainer import build_training_model

        reference = build_training_model(config, ctx.device, init_from=config.train.init, ctx=ctx).eval()
        reference.requires_grad_(False)
    objective = GRPOObjective(config, model, ctx, tokenizer, train, heldout, reference)
    # the starting model on the held-out prompts: what "GRPO raised pass@1" is measured against
    start = evaluate_start(run_dir, BEFORE, lambda: objective.evaluate(model)["grpo"], config.train.init, ctx.is_main)
    if start is not None and ctx.is_main:
        k = config.grpo.pass_k
        print(f"start model, held-out: pass@1 {rate_with_error(start['pass@1'], start['pass@1_stderr'], start['n'])} "
              f"(greedy), " + (f"pass@{k} {start[f'pass@{k}']:.3f}, " if k > 1 else "")
              + f"{k} samples at temperature {config.grpo.temperature:g}, "
              + f"mean@{k} {start[f'mean@{k}']:.3f}, greedy length {start['greedy_mean_length']:.1f} tokens (n {start['n']})",
              flush=True)
    return objective


def run(config: Config, resume: str | None = None, should_stop=None) -> dict:
    """Train with GRPO in the one loop; checks the reward set and prompt sources before the model exists.
    should_stop: the Trainer's hook (the demo's time box)."""
    g = config.grpo
    if config.data.stages:
        raise ConfigError("data.stages: grpo has one stage (its prompts); remove the stages")
    build_rewards(g.rewards, g.num_generations, g.mode, g.overlong_max_len, g.overlong_cache)
    resolve_tokenizer(config)
    load_grpo_prompts(config)
    from smoltrain.train.trainer import Trainer

    return Trainer(config, build_grpo_objective, resume=resume, should_stop=should_stop, evaluation=DuringTraining()).train()


__all__ = ["GRPOObjective", "RolloutBuffer", "RolloutSource", "build_grpo_objective", "load_grpo_config", "load_grpo_prompts", "run"]
