"""Preference pairs: rows with prompt / chosen / rejected, tokenized exactly as TRL 1.16's DPOTrainer does.

Plain text: the end-of-sequence token is appended as text unless present; the prompt is tokenized
alone and prompt + answer together (special tokens, so BOS once when the tokenizer adds one), and the
prompt's length is the shortest common prefix of those tokenizations, so a BPE merge across the
boundary moves a prompt token into the answer. Truncation keeps the start. Conversational rows
(message lists) go through a `render` function (a chat template) instead of plain tokenization.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from smoltrain.data.readers import dataset_rows, input_kind, is_dataset_folder, json_list_rows
from smoltrain.errors import DataError
from smoltrain.files import BadLine, jsonl_rows

KEYS = ("prompt", "chosen", "rejected")
DEFAULT_MAX_LENGTH = 1024  # TRL's DPOConfig.max_length
# (messages, add_generation_prompt, chat_template_kwargs) -> token ids, for conversational rows.
Render = Callable[[list, bool, dict], list[int]]


# ----------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` called like transformers' fast tokenizer (special tokens added by
    its post-processor, e.g. BOS) and the end-of-sequence token's text, as TRL appends it."""

    tokenizer: object
    eos_token: str

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        """A tokenizer.json or a folder; the EOS text comes from tokenizer_config.json's eos_token when
        there is one (what transformers' tokenizer.eos_token says), else the conventional names."""
        from smoltrain.data.tokenizer import load_tokenizer, special_token_id

        tok = load_tokenizer(path)
        p = Path(path)
        config = (p if p.is_dir() else p.parent) / "tokenizer_config.json"
        eos = None
        if config.is_file():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except json.JSONDecodeError as e:
                raise DataError(f"{config}:{e.lineno}: not valid JSON ({e.msg})") from None
            eos = eos.get("content") if isinstance(eos, dict) else eos
        if not isinstance(eos, str) or tok.token_to_id(eos) is None:
            eos = tok.id_to_token(special_token_id(tok, "eos"))
        return cls(tok, eos)


def chat_render(tokenizer: str | os.PathLike, template: str | None = None) -> Render:
    """Conversational rows rendered as TRL renders them: transformers' apply_chat_template on the
    tokenizer's chat template (or a named one: smollm3, chatml), tokenized by it. Loaded on first use."""
    loaded = []

    def render(messages: list, add_generation_prompt: bool, kwargs: dict) -> list[int]:
        if not loaded:
            from smoltrain.post.chat.template import load_chat_tokenizer

            loaded.append(load_chat_tokenizer(tokenizer, template))
        out = loaded[0].apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt, **kwargs)
        return list(out["input_ids"])

    return render


# ----------------------------------------------------------------------------- one pair


@dataclass(frozen=True)
class Pair:
    """One tokenized pair in TRL's form: the shared prompt and the two answers' tokens."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # tokens of the generation prompt an answer's rendering does not continue: a no_think answer that
    # opens a <think> block makes the template drop the empty think block, the shared prompt is cut
    # there and both answers would train on template text ("\n\n</think>\n": think text in no_think replies)
    prompt_cut: int = field(default=0, compare=False)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_conversational(row: dict) -> bool:
    return isinstance(row.get("prompt"), list)


def tokenize_pair(row: dict, tokenizer: TextTokenizer, render: Render | None = None) -> Pair:
    """TRL 1.16's `tokenize_fn` (after `add_eos` for plain text); the row is assumed valid."""
    if is_conversational(row):
        if render is None:
            raise DataError("conversational rows (message lists) need a chat template (dpo.chat_template)")
        kwargs = row.get("chat_template_kwargs") or {}
        prompt_ids = render(row["prompt"], True, kwargs)
        chosen_full = render(row["prompt"] + row["chosen"], False, kwargs)
        rejected_full = render(row["prompt"] + row["rejected"], False, kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
        rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
        prompt_ids = tokenizer.encode(row["prompt"])
        chosen_full = tokenizer.encode(row["prompt"] + chosen)
        rejected_full = tokenizer.encode(row["prompt"] + rejected)
    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return Pair(prompt_ids[:prompt_len], chosen_full[prompt_len:], rejected_full[prompt_len:], len(prompt_ids) - prompt_len)


def _answer_text(value) -> str | None:
    """The answer's text for the emptiness / identity checks (message lists: their contents)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n".join(str(m.get("content", "")) for m in value)
    return None


def check_row(row, conversational_allowed: bool = True) -> tuple[str, str] | None:
    """(reason, kind) when the row is bad before tokenization, else None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}", "not_object"
    missing = [k for k in KEYS if k not in row]
    if missing:
        keys = ", ".join(list(row)[:8]) or "none"
        return f"missing {', '.join(repr(k) for k in missing)} (keys: {keys}; a row needs prompt, chosen, rejected)", "missing_key"
    conversational = isinstance(row["prompt"], list)
    for key in KEYS:
        value = row[key]
        if conversational:
            if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
                return f"'{key}' must be a list of messages (role, content) like the prompt", "bad_type"
        elif not isinstance(value, str):
            return f"'{key}' is {type(value).__name__}, not a string (or a message list in every key)", "bad_type"
    if conversational:
        for key in ("chosen", "rejected"):
            if any(m["role"] != "assistant" for m in row[key]):
                return f"'{key}' must hold assistant messages only", "bad_type"
    for key in ("chosen", "rejected"):
        if not _answer_text(row[key]).strip():
            return f"empty '{key}' answer", "empty_answer"
    if _answer_text(row["chosen"]) == _answer_text(row["rejected"]):
        return "chosen and rejected are identical (no preference to learn)", "identical"
    return None


# ----------------------------------------------------------------------------- files


def read_rows(path: str | os.PathLike, split: str | None = None) -> Iterator[tuple[int | str, object]]:
    """(line number, parsed JSON or a BadLine) of a .jsonl / .jsonl.gz preference file; ("record N", row)
    of a .json list; (row number, row) of one split of a dataset folder."""
    if is_dataset_folder(Path(path)):
        return enumerate(dataset_rows(path, split), start=1)
    if not Path(path).is_file():
        raise DataError(f"{path}: no such preference file")
    if input_kind(Path(path)) == "json":
        return iter(json_list_rows(path))
    return jsonl_rows(path)


@dataclass
class PreferenceData:
    """Tokenized pairs of one or more files, with what was skipped (by kind) and where each came from."""

    pairs: list[Pair]
    sources: list[str]  # "file:line" of each pair
    skipped: Counter = field(default_factory=Counter)
    max_length: int = DEFAULT_MAX_LENGTH

    def __len__(self) -> int:
        return len(self.pairs)


def iter_pairs(path: str | os.PathLike, tokenizer: TextTokenizer, max_length: int, skip_bad: bool, render: Render | None,
               skipped: Counter, split: str | None = None) -> Iterator[tuple[str, Pair]]:
    """("file:line", pair) of every good row of one file, streamed; a bad row is a one-line `file:line`
    DataError, or (skip_bad) counted in `skipped` by kind; split: of a dataset folder."""
    for line_no, row in read_rows(path, split):
        where = f"{path}:{line_no}"
        bad = (row.reason, row.kind) if isinstance(row, BadLine) else check_row(row)
        if bad is None:
            if is_conversational(row) and render is None:
                raise DataError(f"{where}: conversational rows (message lists) need a chat template")
            pair = tokenize_pair(row, tokenizer, render)
            if len(pair.prompt_ids) >= max_length:
                bad = (f"the prompt's {len(pair.prompt_ids)} tokens leave no room for the answers at "
                       f"max_length {max_length}", "prompt_too_long")
            elif not pair.chosen_ids or not pair.rejected_ids:
                bad = ("an answer has no tokens of its own after the prompt", "empty_answer")
            elif is_conversational(row) and pair.prompt_cut > 1:  # one token: a merge across the seam
                bad = (f"an answer changes how the template renders the prompt (its last {pair.prompt_cut} tokens): "
                       "both answers would train on template text; a no_think answer must not open a "
                       "<think> block", "template_mismatch")
        if bad is not None:
            if not skip_bad:
                raise DataError(f"{where}: {bad[0]}")
            skipped[bad[1]] += 1
            continue
        yield where, pair


def load_preferences(
    paths: list[str | os.PathLike] | str | os.PathLike,
    tokenizer: TextTokenizer,
    max_length: int = DEFAULT_MAX_LENGTH,
    skip_bad: bool = False,
    render: Render | None = None,
    split: str | None = None,
) -> PreferenceData:
    """Read and tokenize every row into memory (`smoltrain dpo` prepares them on disk instead:
    post/preference/prepare.py); a bad row is a one-line `file:line` DataError, or a counted skip."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    data = PreferenceData([], [], Counter(), max_length)
    for path in paths:
        for where, pair in iter_pairs(path, tokenizer, max_length, skip_bad, render, data.skipped, split):
            data.pairs.append(pair)
            data.sources.append(where)
    if not data.pairs:
        detail = f" ({sum(data.skipped.values())} bad rows skipped)" if data.skipped else ""
        raise DataError(f"{', '.join(str(p) for p in paths)}: no preference pairs{detail}")
    return data


# ----------------------------------------------------------------------------- batches


def collate(pairs: list[Pair], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's DataCollatorForPreference (keep_start truncation, right padding), in the loop's terms:
    rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], `labels` shifted by one (labels[t] is
    the token at t + 1 where it belongs to an answer, else -100), and per-row answer token counts."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    rows = [r[:max_length] for r in rows]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, prompt_len) in enumerate(zip(rows, prompt_lens)):
        ids = torch.tensor(row, dtype=torch.long)
        input_ids[i, : len(row)] = ids
        start = max(prompt_len, 1)  # the first token of a row has no position predicting it
        labels[i, start - 1 : len(row) - 1] = ids[start:]
    return {"input_ids": input_ids, "labels": labels, "completion_tokens": (labels != -100).sum(dim=1)}


def summed_logprobs(token_logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, seq] per-token log-probs (0 where labels is -100) -> (chosen sums, rejected sums), [B] each."""
    sums = torch.where(labels != -100, token_logprobs, 0.0).sum(dim=1)
    return sums.chunk(2)


__all__ = [
    "TextTokenizer", "Pair", "chat_render", "PreferenceData", "tokenize_pair", "check_row", "iter_pairs", "load_preferences", "collate",
    "summed_logprobs", "common_prefix_length", "DEFAULT_MAX_LENGTH",
]
