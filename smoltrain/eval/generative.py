"""Generative tasks: decode an answer with the KV cache, compare it with the gold answer.

Exact match compares stripped strings; quasi-exact match compares normalised final answers (lower
case, articles and punctuation dropped, numbers canonical so "1,000.50" equals "1000.5"), or, for a
task that extracts its answer (GSM8K), asks the one answer checker (eval.answers). With k > 1
samples per item we report avg@k (mean correctness) and the unbiased pass@k estimator.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from smoltrain.eval.answers import final_answer, is_correct
from smoltrain.eval.scoring import encode, standard_error
from smoltrain.eval.tasks import Task, build_prompt

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WORD_OR_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|[^\W_]+")
_ARTICLES = {"a", "an", "the"}


def _canonical_number(text: str) -> str:
    value = float(text.replace(",", ""))
    if value.is_integer():
        return str(int(value))
    return repr(value)


def normalize_answer(text: str) -> str:
    """Lower case, canonical numbers, no punctuation or articles, single spaces."""
    text = _NUMBER.sub(lambda m: _canonical_number(m.group()), text.lower())
    return " ".join(w for w in _WORD_OR_NUMBER.findall(text) if w not in _ARTICLES)


def exact_match(prediction: str, gold: str) -> bool:
    return prediction.strip() == gold.strip()


def quasi_exact_match(prediction: str, gold: str, extract: str | None = None) -> bool:
    """Normalised equality of the final answer (after the last `</think>`); `extract="last_number"`
    (a worked solution ending in its answer, as GSM8K's) asks eval.answers.is_correct, the judge of
    GRPO's rewards and the chat evals."""
    if extract == "last_number":
        return is_correct(prediction, gold)
    return normalize_answer(final_answer(prediction)) == normalize_answer(gold)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them
    correct) is correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop sequence."""
    end = len(text)
    for s in stop:
        position = text.find(s)
        if position != -1:
            end = min(end, position)
    return text[:end]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _single_token_ids(tokenizer, stops: Sequence[str]) -> set[int]:
    # A stop sequence that is exactly one token can also end decoding early; longer ones are cut
    # from the text afterwards.
    ids = set()
    for s in stops:
        encoded = encode(tokenizer, s)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return ids


@torch.no_grad()
def score_generative(
    model,
    tokenizer,
    task: Task,
    batch_size: int = 16,
    seed: int = 0,
    prefix_ids: Sequence[int] = (),
    stop_token_ids: Sequence[int] = (),
    on_batch: Callable[[int], None] | None = None,
    details: list | None = None,
) -> dict:
    """exact_match and quasi_exact_match (greedy), or avg@k and pass@k with k samples per item."""
    from smoltrain.model.generate import generate

    k = task.num_samples
    temperature = task.temperature if task.temperature > 0 or k == 1 else 0.8
    max_len = model.config.max_seq_len
    prompts, items = [], []
    for index in range(len(task.items)):
        context, item = build_prompt(task, index, seed)
        ids = list(prefix_ids) + encode(tokenizer, context)
        prompts.append(ids[-(max_len - task.max_new_tokens) :])  # keep the end: it holds the question
        items.append((context, item))
    # Every sample of every prompt, longest prompts together so padding stays small.
    rows = sorted(((i, s) for i in range(len(prompts)) for s in range(k)), key=lambda r: -len(prompts[r[0]]))
    completions: dict[tuple[int, int], str] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        stops = sorted({s for i, _ in batch for s in items[i][1]["stop"]})
        stop_ids = sorted(set(stop_token_ids) | _single_token_ids(tokenizer, stops))
        outputs = generate(
            model,
            [prompts[i] for i, _ in batch],
            max_new_tokens=task.max_new_tokens,
            temperature=temperature,
            stop_tokens=stop_ids,
            seed=None if temperature == 0 else seed * 1_000_003 + start,
        )
        for (i, s), new_ids in zip(batch, outputs):
            completions[(i, s)] = cut_at_stop(_decode(tokenizer, new_ids), items[i][1]["stop"])
        if on_batch is not None:
            on_batch(len(batch))

    exact, quasi, avg, passed = [], [], [], []
    for i, (context, item) in enumerate(items):
        samples = [completions[(i, s)] for s in range(k)]
        correct = [quasi_exact_match(p, item["answer"], item.get("extract")) for p in samples]
        exact.append(float(exact_match(samples[0], item["answer"])))
        quasi.append(float(correct[0]))
        avg.append(sum(correct) / k)
        passed.append(pass_at_k(k, sum(correct), k))
        if details is not None:
            details.append({"task": task.name, "context": context, "answer": item["answer"], "predictions": samples, "correct": correct})
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    if k == 1:
        result = {"exact_match": mean(exact), "quasi_exact_match": mean(quasi)}
    else:
        result = {f"avg@{k}": mean(avg), f"pass@{k}": mean(passed)}
    per_item = {"exact_match": exact, "quasi_exact_match": quasi, f"avg@{k}": avg, f"pass@{k}": passed}
    result[f"{task.metric}_stderr"] = standard_error(per_item.get(task.metric, quasi))
    result["n"] = len(items)
    return result


def count_generations(task: Task) -> int:
    return len(task.items) * task.num_samples
