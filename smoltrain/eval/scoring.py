"""Log-likelihood multiple choice, scored exactly as lighteval scores it.

The context/answer boundary follows lighteval (and lm-evaluation-harness): trailing spaces of
the context move to the answer, context+answer is encoded as one string, and the answer's tokens
are those after the context's own encoding. Requests are sorted by length and batched so padding
stays small; ties between choices go to the first one (numpy's argmax, as lighteval).
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch

from smoltrain.data.tokenizer import ROLE_TOKENS
from smoltrain.errors import DataError
from smoltrain.eval.tasks import Task, build_prompt
from smoltrain.model.transformer import token_logprobs

log = logging.getLogger(__name__)

# Float32 log-probabilities alive at once: 2^26 elements = 256 MiB (a 49k vocabulary x 1.3k tokens).
LOGPROB_CHUNK_ELEMENTS = 2**26


# ----------------------------------------------------------------------------- tokenisation


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for a `tokenizers.Tokenizer` or a transformers tokenizer."""
    if not text:
        return []
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lighteval's boundary."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def load_tokenizer(path: str | os.PathLike):
    """The data package's loader when present, else a tokenizer.json (or a folder holding one)."""
    try:
        from smoltrain.data.tokenizer import load_tokenizer as data_load_tokenizer
    except ImportError:
        data_load_tokenizer = None
    if data_load_tokenizer is not None:
        return data_load_tokenizer(path)
    from tokenizers import Tokenizer

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"{p}: no tokenizer.json")
    return Tokenizer.from_file(str(file))


EOT_NAMES = tuple(ROLE_TOKENS["eos"])


def end_of_text_id(tokenizer) -> int | None:
    for name in EOT_NAMES:
        token_id = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else tokenizer.convert_tokens_to_ids(name)
        if token_id is not None:
            return token_id
    return None


# ----------------------------------------------------------------------------- model calls


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def sum_over_ranks(model, sums: torch.Tensor, forwards: Sequence[int], rank: int, group, padding_ids: torch.Tensor) -> torch.Tensor:
    """The end of scoring split over data-parallel ranks: run padding forwards until this rank has
    run as many as the busiest (`forwards[r]` per rank; FSDP gathers the weights in every forward,
    with all ranks of its group), then sum `sums` over the group. `padding_ids` is one real row:
    sequence parallel splits its length over TP ranks, so a single token would not do."""
    for _ in range(max(forwards) - forwards[rank]):
        model(padding_ids)
    torch.distributed.all_reduce(sums, group=group)
    return sums


def padded_width(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple`: right padding, which causal attention never sees."""
    return -(-width // multiple) * multiple


def padding_row(inputs: Sequence[int], multiple: int) -> torch.Tensor:
    """[1, width] ids of one real row, right-padded with zeros to a multiple of `multiple`."""
    row = torch.zeros(1, padded_width(len(inputs), multiple), dtype=torch.long)
    row[0, : len(inputs)] = torch.tensor(list(inputs), dtype=torch.long)
    return row


@torch.no_grad()
def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    max_len: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    data_parallel: tuple[int, int, object] | None = None,
    pad_multiple: int = 1,
) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context, continuation).

    Contexts are cut from the left when context + continuation exceeds `max_len` + 1 tokens.
    Requests whose model inputs are identical (one context, answers differing only in their last
    token: letters, one-token words, numbers after a shared space) share one row, which reads
    every answer's last token from the same distribution: 4x fewer rows on lettered choices.
    Rows are sorted longest first and batched (right padding, which causal attention never
    sees), so a batch's padded length stays close to its longest member.

    data_parallel = (dp_rank, dp_world, process group): each rank scores every dp_world-th batch,
    and the results are summed over the group (each request is scored on one rank, zeros elsewhere,
    so the sums are exact). Ranks run equally many forwards, for FSDP's gathers.

    pad_multiple: every batch's width is padded up to a multiple of it (the TP degree under
    sequence parallel, which splits the sequence dimension over the TP ranks).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if max_len is None:
        max_len = model.config.max_seq_len
    row_of: dict[tuple, int] = {}
    rows: list[tuple[list[int], int]] = []  # (inputs, number of scored positions at the end)
    members: list[list[tuple[int, int]]] = []  # per row: (request index, its last target token)
    for index, (context, continuation) in enumerate(requests):
        if not continuation or not context:
            raise ValueError("every request needs at least one context and one continuation token")
        if len(continuation) > max_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's {max_len}")
        whole = (list(context) + list(continuation))[-(max_len + 1) :]
        key = (tuple(whole[:-1]), len(continuation))
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append((whole[:-1], len(continuation)))
            members.append([])
        members[row_of[key]].append((index, whole[-1]))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    results = [0.0] * len(requests)
    rank, world, group = data_parallel or (0, 1, None)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in batches[rank::world]:
        width = padded_width(len(rows[batch[0]][0]), pad_multiple)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        # Candidate labels per position: the answer's own next tokens in column 0, and at the last
        # position every member's final token; -100 (not scored) everywhere else.
        labels = torch.full((len(batch), width, max(len(members[r]) for r in batch)), -100, dtype=torch.long)
        for b, r in enumerate(batch):
            inputs, num_scored = rows[r]
            input_ids[b, : len(inputs)] = torch.tensor(inputs)
            # Targets before the last are the row's own next inputs, the same for every member.
            labels[b, len(inputs) - num_scored : len(inputs) - 1, 0] = torch.tensor(inputs[len(inputs) - num_scored + 1 :])
            labels[b, len(inputs) - 1, : len(members[r])] = torch.tensor([target for _, target in members[r]])
        with _autocast(device, autocast_dtype):
            logprobs = token_logprobs(model, input_ids.to(device), labels.to(device))
        logprobs = logprobs.double().cpu()
        for b, r in enumerate(batch):
            inputs, num_scored = rows[r]
            head = float(logprobs[b, len(inputs) - num_scored : len(inputs) - 1, 0].sum())
            for j, (index, _) in enumerate(members[r]):
                results[index] = head + float(logprobs[b, len(inputs) - 1, j])
        if on_batch is not None:
            on_batch(sum(len(members[r]) for r in batch))
    if world > 1 and batches:  # every rank sees the same batches, so all skip or none
        summed = sum_over_ranks(model, torch.tensor(results, dtype=torch.float64, device=device),
                                [len(batches[r::world]) for r in range(world)], rank, group,
                                padding_row(rows[order[0]][0], pad_multiple).to(device))
        results = summed.tolist()
    return results


# ----------------------------------------------------------------------------- metrics


def _argmax_first(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_metrics(logprobs: Sequence[float], choices: Sequence[str], token_counts: Sequence[int], gold: int) -> dict[str, float]:
    """lighteval's four accuracies for one item: argmax of the raw sum, of the sum per character,
    per character not counting a leading space, and per answer token."""
    per_char = [lp / len(c) for lp, c in zip(logprobs, choices)]
    per_char_nospace = [lp / max(1, len(c) - 1 if c.startswith(" ") else len(c)) for lp, c in zip(logprobs, choices)]
    per_token = [lp / max(1, n) for lp, n in zip(logprobs, token_counts)]
    return {
        "acc": float(_argmax_first(logprobs) == gold),
        "acc_norm": float(_argmax_first(per_char) == gold),
        "acc_norm_nospace": float(_argmax_first(per_char_nospace) == gold),
        "acc_norm_token": float(_argmax_first(per_token) == gold),
    }


MULTIPLE_CHOICE_METRICS = ("acc", "acc_norm", "acc_norm_nospace", "acc_norm_token")


def standard_error(values: Sequence[float]) -> float:
    """Sample standard error of a mean (0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


MIN_ITEMS_FOR_STDERR = 30  # fewer items: the normal approximation says little (at 8 of 8 right it says ± 0.000)


def rate_with_error(value: float, stderr: float, n: int) -> str:
    """'0.750 ± 0.043', or under 30 items '0.750 (n 8: a standard error is not meaningful below 30)'."""
    if n < MIN_ITEMS_FOR_STDERR:
        return f"{value:.3f} (n {n}: a standard error is not meaningful below {MIN_ITEMS_FOR_STDERR})"
    return f"{value:.3f} ± {stderr:.3f}"


def score_multiple_choice(
    model,
    tokenizer,
    task: Task,
    batch_size: int = 16,
    seed: int = 0,
    prefix_ids: Sequence[int] = (),
    empty_context_ids: Sequence[int] = (),
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    details: list | None = None,
    data_parallel: tuple[int, int, object] | None = None,
    pad_multiple: int = 1,
) -> dict:
    """Every metric averaged over the task's items, with "n" and the main metric's standard error.

    `prefix_ids` (e.g. a BOS token) start every context; an empty context becomes
    `empty_context_ids` (lighteval uses the end-of-text token) so the first answer token has
    something to condition on.
    """
    requests, owners, texts = [], [], []
    fallbacks = 0
    for index in range(len(task.items)):
        context, item = build_prompt(task, index, seed)
        for choice in item["choices"]:
            context_ids, continuation_ids = encode_pair(tokenizer, context, choice)
            if not context_ids:
                context_ids = list(empty_context_ids)
            context_ids = list(prefix_ids) + context_ids
            if not context_ids:
                raise DataError(f"task {task.name}: item {index} has an empty context and the tokenizer no end-of-text token")
            if not continuation_ids:
                # The whole string merged the answer into the context's last token, which would
                # score an empty answer (log-likelihood 0, always chosen): encode it on its own.
                continuation_ids = encode(tokenizer, context[len(context.rstrip()):] + choice)
                fallbacks += 1
            requests.append((context_ids, continuation_ids))
        owners.append((len(requests) - len(item["choices"]), item))
        texts.append(context)
    if fallbacks:
        log.warning("task %s: %d answers merged into the context's last token; scored them tokenised alone", task.name, fallbacks)
    sums = loglikelihoods(model, requests, batch_size=batch_size, autocast_dtype=autocast_dtype, on_batch=on_batch,
                          data_parallel=data_parallel, pad_multiple=pad_multiple)
    per_item = []
    for (first, item), context in zip(owners, texts):
        k = len(item["choices"])
        lps = sums[first : first + k]
        counts = [len(requests[first + j][1]) for j in range(k)]
        metrics = choice_metrics(lps, item["choices"], counts, item["gold"])
        per_item.append(metrics)
        if details is not None:
            details.append({"task": task.name, "context": context, "choices": item["choices"], "gold": item["gold"],
                            "logprobs": lps, **metrics})
    result = {m: sum(x[m] for x in per_item) / len(per_item) for m in MULTIPLE_CHOICE_METRICS}
    result[f"{task.metric}_stderr"] = standard_error([x[task.metric] for x in per_item])
    result["n"] = len(per_item)
    return result


def count_requests(task: Task) -> int:
    """Forward rows a multiple-choice task needs (one per choice), for progress bars."""
    return sum(len(item["choices"]) for item in task.items)
