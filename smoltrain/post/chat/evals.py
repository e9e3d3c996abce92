"""Chat evals: generate through the chat template in both modes and check what a program can check.

Held-out arithmetic answered in no_think and in think mode (accuracy), held-out questions under a
rule's system prompt (adherence: the rule is checked on the final answer of a reply that ended its
turn), the think format of
think-mode replies (one closed think block first, then an answer; counted on the think set only,
since a no_think reply without tags is what any base model writes and would score it for nothing),
the stop rate (the end-of-turn token before the length limit) and the mean
reply length. Greedy decoding with the KV cache; every rate comes with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from smoltrain.eval.answers import final_answer, is_correct
from smoltrain.eval.scoring import standard_error
from smoltrain.model.generate import generate
from smoltrain.model.modes import evaluating
from smoltrain.post.chat.template import END_THINK, THINK, encode_prompt, end_of_turn_id, has_reasoning_modes
from smoltrain.post.embedded import arithmetic_prompts, follows_rule, persona_prompts


def think_format_ok(response: str, mode: str) -> bool:
    """think: '<think>' first, one closed block, a non-empty answer after it; no_think: no think tags."""
    if mode == "no_think":
        return THINK not in response and END_THINK not in response and bool(response.strip())
    if not response.lstrip().startswith(THINK) or response.count(THINK) != 1 or response.count(END_THINK) != 1:
        return False
    return bool(final_answer(response))


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[dict], max_new_tokens: int, batch_size: int = 32,
                     temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                     on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """{"text", "tokens", "stopped"} per prompt ({"messages", "chat_template_kwargs"}), through the template."""
    eot = end_of_turn_id(tokenizer)
    encoded = [encode_prompt(tokenizer, p["messages"], **p.get("chat_template_kwargs", {})) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths together: less padding
    replies: list[dict | None] = [None] * len(prompts)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            outputs = generate(model, [encoded[i] for i in rows], max_new_tokens, temperature=temperature, top_p=top_p,
                               stop_tokens=[eot], seed=None if seed is None else seed + start)
            for i, ids in zip(rows, outputs):
                # generate cuts before the stop token: fewer tokens than the limit means it stopped
                replies[i] = {"text": tokenizer.decode(ids, skip_special_tokens=False), "tokens": len(ids),
                              "stopped": len(ids) < max_new_tokens}
            if on_batch is not None:
                on_batch(len(rows))
    return replies


def _rate(name: str, values: list[float], out: dict, items: dict | None) -> None:
    out[name] = sum(values) / len(values) if values else float("nan")
    out[f"{name}_stderr"] = standard_error(values)
    if items is not None:
        items[name] = values


def chat_evals(model, tokenizer, count: int = 50, persona_count: int = 48, seed: int = 0,
               max_new_tokens: int = 48, think_max_new_tokens: int = 160, batch_size: int = 32,
               details: list | None = None, think_count: int | None = None, per_item: bool = False) -> dict:
    """{"no_think_accuracy", "think_accuracy", "adherence", "think_format", "stop_rate",
    "no_think_length", "think_length"} each with "<name>_stderr", plus "n" per set.

    think_count: items of the think set (default `count`; its replies are the long ones). `per_item`
    adds "items": each metric's per-item values in a fixed order (the sets are a function of the
    counts and the seed), so two models evaluated alike can be compared item by item (paired).
    `details` (a list) receives every prompt, reply and verdict, for the vibe test in reports.
    A template without reasoning modes (SmolLM2's) has no think set: its think metrics are NaN (n/a)."""
    modes = has_reasoning_modes(tokenizer)
    think_count = 0 if not modes else count if think_count is None else think_count
    sets = {
        "no_think": (arithmetic_prompts("heldout", count, seed, "no_think"), max_new_tokens),
        "think": (arithmetic_prompts("heldout", think_count, seed, "think"), think_max_new_tokens),
        "persona": (persona_prompts("heldout", persona_count, seed, "no_think"), max_new_tokens),
    }
    results: dict = {}
    correct = {"no_think": [], "think": []}
    adherence, formats, stops = [], [], []
    lengths = {"no_think": [], "think": []}
    for name, (prompts, limit) in sets.items():
        if not prompts:
            continue
        replies = generate_replies(model, tokenizer, prompts, limit, batch_size)
        mode = "think" if name == "think" else "no_think"
        for prompt, reply in zip(prompts, replies):
            text = reply["text"]
            verdict = {"format": think_format_ok(text, mode), "stopped": reply["stopped"]}
            if mode == "think":
                formats.append(float(verdict["format"]))
            stops.append(float(reply["stopped"]))
            if name == "persona":
                # a reply cut at the token limit is no answer: 48 tokens of "0.0.0..." are one "word"
                verdict["follows_rule"] = reply["stopped"] and follows_rule(prompt["rule"], text)
                adherence.append(float(verdict["follows_rule"]))
            else:
                verdict["correct"] = is_correct(text, prompt["answer"])
                correct[name].append(float(verdict["correct"]))
                lengths[name].append(float(reply["tokens"]))
            if details is not None:
                details.append({"set": name, "messages": prompt["messages"],
                                "chat_template_kwargs": prompt.get("chat_template_kwargs", {}),
                                "reference": prompt["rule"] if name == "persona" else prompt["answer"], "reply": text,
                                "tokens": reply["tokens"], **verdict})
    items = {} if per_item else None
    _rate("no_think_accuracy", correct["no_think"], results, items)
    _rate("think_accuracy", correct["think"], results, items)
    _rate("adherence", adherence, results, items)
    _rate("think_format", formats, results, items)
    _rate("stop_rate", stops, results, items)
    _rate("no_think_length", lengths["no_think"], results, items)
    _rate("think_length", lengths["think"], results, items)
    results["n"] = {name: len(prompts) for name, (prompts, _) in sets.items()}
    results["reasoning_modes"] = modes
    if items is not None:
        results["items"] = items
    return results


VIBE_PROMPTS = [
    {"messages": [{"role": "user", "content": "What does json.dumps do?"}], "chat_template_kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "user", "content": "Compute 12 + 7 * 3 - 5."}], "chat_template_kwargs": {"enable_thinking": True}},
    {"messages": [{"role": "system", "content": "Answer in capital letters only."},
                  {"role": "user", "content": "What does os.path.join do?"}], "chat_template_kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "system", "content": "End every answer with the word banana. /no_think"},
                  {"role": "user", "content": "Ava buys 3 apples at $2 each and 2 books at $5 each. "
                                              "How many dollars does Ava spend in total?"}]},
]


def vibe_test(model, tokenizer, max_new_tokens: int = 160, prompts: list[dict] | None = None) -> list[dict]:
    """Sample chats to read (both modes, with a persona): the playbook's bug was caught by reading these."""
    prompts = prompts or VIBE_PROMPTS
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens)
    return [{"messages": p["messages"], "chat_template_kwargs": p.get("chat_template_kwargs", {}), "reply": r["text"]}
            for p, r in zip(prompts, replies)]


def vibe_markdown(samples: list[dict]) -> str:
    lines = []
    for sample in samples:
        kwargs = sample.get("chat_template_kwargs") or {}
        mode = "" if "enable_thinking" not in kwargs else (" (think)" if kwargs["enable_thinking"] else " (no_think)")
        for message in sample["messages"]:
            lines.append(f"**{message['role']}**{mode if message['role'] == 'user' else ''}: {message['content']}  ")
        lines.append(f"**assistant**: `{sample['reply']!r}`\n")
    return "\n".join(lines)


POOLED = {"accuracy": ("no_think_accuracy", "think_accuracy")}  # a metric that is the mean of per-mode rates
SIGNIFICANT = 2.0  # standard errors of the difference: a change inside them is no clear change
MIN_LENGTH_CHANGE = 1.0  # tokens: a reply length that moves less is no clear change however tight its error


def mean_of(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """(mean of the values, standard error of that mean) of independent (value, standard error) parts."""
    return sum(v for v, _ in parts) / len(parts), math.hypot(*(e for _, e in parts)) / len(parts)


def rate(chat: dict, metric: str) -> tuple[float | None, float | None]:
    """(value, standard error) of a metric of chat_evals' results, a POOLED one too (the mean of its parts)."""
    if metric in POOLED:
        parts = [(chat.get(n), chat.get(f"{n}_stderr") or 0) for n in POOLED[metric]]
        return (None, None) if any(v is None for v, _ in parts) else mean_of(parts)
    return chat.get(metric), chat.get(f"{metric}_stderr")


def paired_difference(before: dict, after: dict, metric: str) -> tuple[float, float] | None:
    """(mean per-item difference after - before, its standard error) of `metric` in two chat_evals results
    (per_item=True) of the same items: a POOLED metric per part, then pooled like the rates; None when the
    two were not scored on the same items."""
    parts = []
    for name in POOLED.get(metric, (metric,)):
        a, b = ((r.get("items") or {}).get(name) for r in (before, after))
        if not a or not b or len(a) != len(b):
            return None
        diffs = [y - x for x, y in zip(a, b)]
        parts.append((sum(diffs) / len(diffs), standard_error(diffs)))
    return mean_of(parts)


def change(before: dict, after: dict, metric: str) -> tuple[float, str] | None:
    """(after - before, "moved" or "no clear change") of a metric of two chat_evals results; None when either
    lacks it. The noise is the standard error of the per-item differences when both scored the same items (a
    paired test: 20 of 400 items turning right is a clear move although each side is +-2.4 points), else the
    two standard errors combined. A rate at 0% or 100% on both sides has no noise: any difference is a move."""
    (a, sa), (b, sb) = rate(before, metric), rate(after, metric)
    if a is None or b is None:
        return None
    diff, noise = paired_difference(before, after, metric) or (b - a, math.hypot(sa or 0, sb or 0))
    small = metric.endswith("length") and abs(diff) < MIN_LENGTH_CHANGE  # 7.0 -> 6.9 tokens is no story
    return diff, "no clear change" if abs(diff) < SIGNIFICANT * noise or diff == 0 or small else "moved"

__all__ = ["POOLED", "VIBE_PROMPTS", "change", "chat_evals", "generate_replies", "mean_of", "paired_difference", "rate",
           "think_format_ok", "vibe_markdown", "vibe_test"]
