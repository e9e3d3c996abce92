"""Verifiable rewards as plug-ins: `grpo.rewards: {name: weight}` sums named functions, each logged
on its own. Every function, built-in or the user's `module:function`, has TRL's signature
`f(prompts, completions, completion_ids, **columns) -> list[float | None]` (columns: the prompt
source's fields, e.g. `answer`, `mode`, and `trainer_state`), so a TRL reward function plugs in unchanged:
with conversational prompts (`messages` rows) the user's functions get TRL's shapes, each completion
`[{"role": "assistant", "content": text}]`; the built-ins read the text.

None means "cannot score this one" (TRL: the function does not apply): it is left out of the sum;
a completion no function could score gets advantage 0 and is counted. A function that raises or
returns the wrong number of values stops the run with one line naming it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from smoltrain.errors import ConfigError, SmoltrainError
from smoltrain.eval.answers import is_correct
from smoltrain.post.rl.grpo import soft_overlong_penalty

BUILTIN = ("math_answer", "format", "overlong", "length_group")


class RewardError(SmoltrainError):
    """A reward function failed or broke the contract; the message names it."""


# ----------------------------------------------------------------------------- built-in rewards


def math_answer(prompts, completions, completion_ids, answer=None, **columns) -> list[float | None]:
    """1 when the completion's answer equals the reference `answer` column (eval.answers.is_correct, the
    chat evals' and pass@k's judge too), else 0 (None where a row has no reference)."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if ref is None else float(is_correct(c, ref)) for c, ref in zip(completions, answers)]


def format_reward(mode: str = "no_think"):
    """1 when the think block is well formed for the prompt's mode (column `mode`, else the run's), as
    the chat evals check it: think -> one closed block first, then an answer; no_think -> no think
    tags (the template's generation prompt already holds the empty block), an answer."""
    from smoltrain.post.chat.evals import think_format_ok

    def format(prompts, completions, completion_ids, mode=None, **columns):
        modes = mode if mode is not None else [default] * len(completions)
        return [float(think_format_ok(c, m)) for c, m in zip(completions, modes)]

    default = mode
    return format


def overlong_reward(max_len: int, cache: int):
    """DAPO's soft overlong penalty on the completion's length in tokens (see grpo.soft_overlong_penalty)."""
    if not 0 < cache <= max_len:
        raise ConfigError(f"grpo.overlong_cache must lie in (0, grpo.overlong_max_len = {max_len}], got {cache}")

    def overlong(prompts, completions, completion_ids, **columns):
        return [soft_overlong_penalty(len(ids), max_len, cache) for ids in completion_ids]

    return overlong


def length_group_reward(group_size: int):
    """Kimi k1.5's length reward per group: lambda = 0.5 - (len - min) / (max - min); a correct answer
    gets lambda, a wrong one min(0, lambda); 0 for a group of equal lengths."""

    def length_group(prompts, completions, completion_ids, answer=None, **columns):
        correct = math_answer(prompts, completions, completion_ids, answer=answer)
        lengths = [len(ids) for ids in completion_ids]
        out: list[float | None] = []
        for start in range(0, len(lengths), group_size):
            group = lengths[start : start + group_size]
            low, high = min(group), max(group)
            for n, ok in zip(group, correct[start : start + group_size]):
                if high == low:
                    out.append(0.0)
                    continue
                lam = 0.5 - (n - low) / (high - low)
                out.append(None if ok is None else (lam if ok else min(0.0, lam)))
        return out

    return length_group


# ----------------------------------------------------------------------------- the set of rewards


@dataclass
class Reward:
    name: str
    weight: float
    function: Callable
    builtin: bool = False  # reads completions as text whatever the prompts' shape


@dataclass(frozen=True)
class RewardState:
    """TRL's `trainer_state` as reward functions read it (shaping by training progress)."""

    global_step: int  # optimizer steps done before this rollout batch
    max_steps: int


def load_user_function(spec: str) -> Callable:
    """`package.module:function` -> the function; a ConfigError naming the spec otherwise."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"grpo.rewards: {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"grpo.rewards: cannot import {module_name!r} for {spec!r} ({e})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"grpo.rewards: {module_name!r} has no function {attribute!r}")
    return function


def build_rewards(weights: Mapping[str, float], group_size: int, mode: str = "no_think",
                  overlong_max_len: int = 0, overlong_cache: int = 0) -> list[Reward]:
    """The configured reward functions with their weights, in the config's order."""
    if not weights:
        raise ConfigError("grpo.rewards is empty: name at least one reward (e.g. {math_answer: 1.0})")
    rewards = []
    for name, weight in weights.items():
        if name == "math_answer":
            function = math_answer
        elif name == "format":
            function = format_reward(mode)
        elif name == "overlong":
            if overlong_max_len <= 0:
                raise ConfigError("grpo.rewards has 'overlong': set grpo.overlong_max_len (tokens) and grpo.overlong_cache")
            function = overlong_reward(overlong_max_len, overlong_cache)
        elif name == "length_group":
            function = length_group_reward(group_size)
        else:
            function = load_user_function(name)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"grpo.rewards.{name}: the weight must be a finite number, got {weight!r}")
        rewards.append(Reward(name, float(weight), function, builtin=name in BUILTIN))
    return rewards


@dataclass
class Scores:
    total: torch.Tensor  # [N] weighted sum over the functions that scored each completion
    scorable: torch.Tensor  # [N] bool: at least one function scored it
    per_function: dict[str, list[float | None]]


def score(rewards: Sequence[Reward], prompts: list, completions: list[str], completion_ids: list[list[int]],
          columns: Mapping[str, list], state: RewardState | None = None) -> Scores:
    """Call every reward function on the whole batch and sum the weighted values (None left out)."""
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float64)
    scorable = torch.zeros(n, dtype=torch.bool)
    per_function = {}
    conversational = bool(prompts) and isinstance(prompts[0], list)  # TRL's is_conversational: a list of messages
    as_messages = [[{"role": "assistant", "content": text}] for text in completions] if conversational else completions
    extra = {"trainer_state": state} if state is not None else {}
    for reward in rewards:
        given = completions if reward.builtin else as_messages
        try:
            values = reward.function(prompts=prompts, completions=given, completion_ids=completion_ids, **columns, **extra)
        except SmoltrainError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code: any failure stops the run with its name
            raise RewardError(f"reward function {reward.name!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward function {reward.name!r} returned {got} for {n} completions (expected a list of {n} floats or None)")
        clean = []
        for i, value in enumerate(values):
            if value is None:
                clean.append(None)
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(f"reward function {reward.name!r} returned {value!r} at index {i} (expected a finite float or None)")
            clean.append(float(value))
            total[i] += reward.weight * float(value)
            scorable[i] = True
        per_function[reward.name] = clean
    return Scores(total=total, scorable=scorable, per_function=per_function)


__all__ = [
    "BUILTIN",
    "Reward",
    "RewardError",
    "RewardState",
    "Scores",
    "build_rewards",
    "format_reward",
    "length_group_reward",
    "load_user_function",
    "math_answer",
    "overlong_reward",
    "score",
]
