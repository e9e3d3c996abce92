"""SFT data: conversations -> token ids and loss targets (from the template's generation mask),
best-fit-decreasing packing into rows, the data check and report, and the batch source.

A packed row holds whole conversations, each with its own document id, so positions restart and no
token attends across conversations (the model's document masking): a packed conversation gets the
logits it would get alone. Packing never splits a conversation; one longer than a row is truncated
(its start kept) or dropped. The data check renders every conversation that has a system prompt and
stops when the text lacks it: the bug that cost SmolLM3's SFT every system prompt cannot pass.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from smoltrain.errors import DataError
from smoltrain.post.chat_data import Conversation, conversation_mode, system_prompt
from smoltrain.post.chat_template import encode_chat, render

STATE_VERSION = 1


@dataclass
class Example:
    ids: np.ndarray  # int64 token ids of the rendered conversation
    targets: np.ndarray  # bool: token j is predicted (a label) from token j-1
    source: str
    index: int  # position in the conversation list


def tokenize_conversations(conversations: list[Conversation], tokenizer, seq_len: int, loss: str = "assistant",
                           overflow: str = "truncate") -> tuple[list[Example], dict]:
    """Examples that fit a row of seq_len, and the counts the data report shows."""
    if loss not in ("assistant", "all"):
        raise DataError(f"sft.loss must be assistant or all, got {loss!r}")
    if overflow not in ("truncate", "drop"):
        raise DataError(f"sft.overflow must be truncate or drop, got {overflow!r}")
    examples, stats = [], Counter()
    tokens_by_source, targets_by_source = Counter(), Counter()
    for index, conv in enumerate(conversations):
        ids, mask = encode_chat(tokenizer, conv.messages, **conv.kwargs)
        ids = np.asarray(ids, dtype=np.int64)
        targets = np.asarray(mask, dtype=bool) if loss == "assistant" else np.ones(len(ids), dtype=bool)
        targets[0] = False  # nothing predicts the first token
        if len(ids) > seq_len:
            if overflow == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, targets = ids[:seq_len], targets[:seq_len]
            if not targets.any():
                stats["dropped_no_target"] += 1  # truncated before the first assistant token
                continue
            stats["truncated"] += 1
        if not targets.any():
            stats["dropped_no_target"] += 1
            continue
        examples.append(Example(ids, targets, conv.source, index))
        tokens_by_source[conv.source] += len(ids)
        targets_by_source[conv.source] += int(targets.sum())
    stats_dict = dict(stats)
    stats_dict["tokens_by_source"] = dict(tokens_by_source)
    stats_dict["targets_by_source"] = dict(targets_by_source)
    return examples, stats_dict


# ----------------------------------------------------------------------------- packing


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the open row with the least room that fits it
    (a new row when none does). Returns the item indices of each row; no item is split."""
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must lie in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            free, row = capacity - lengths[i], len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


def one_per_row(lengths: list[int]) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


# ----------------------------------------------------------------------------- the data check and report


def check_system_prompts(conversations: list[Conversation], tokenizer) -> dict:
    """Counts of conversations with a system prompt and of those whose rendered text contains it;
    DataError naming the first conversation whose prompt was lost (the two counts must be equal)."""
    with_prompt = rendered = 0
    for conv in conversations:
        prompt = system_prompt(conv)
        if prompt is None:
            continue
        with_prompt += 1
        if prompt in render(tokenizer, conv.messages, **conv.kwargs):
            rendered += 1
        else:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise DataError(f"{conv.where or 'conversation ' + str(conv)}: its system prompt {short!r} is not in the "
                            "rendered chat (the template dropped it: the SmolLM3 SFT bug); choose a template that "
                            "renders system prompts (smollm3)" + (", or set sft.instructions_as_system: true to move "
                            "custom_instructions into a system message" if "custom_instructions" in conv.kwargs else ""))
    return {"with_system_prompt": with_prompt, "system_prompt_rendered": rendered}


def _example_texts(conversations: list[Conversation], tokenizer) -> dict[str, str]:
    """One rendered conversation per mode and one with a system prompt, for people to read."""
    picks = {}
    for conv in conversations:
        mode = conversation_mode(conv)
        if mode in ("think", "no_think") and mode not in picks and system_prompt(conv) is None:
            picks[mode] = conv
        if "system_prompt" not in picks and system_prompt(conv) is not None:
            picks["system_prompt"] = conv
        if len(picks) == 3:
            break
    return {name: render(tokenizer, conv.messages, **conv.kwargs) for name, conv in picks.items()}


def data_report(conversations: list[Conversation], examples: list[Example], stats: dict, rows: list[list[int]],
                seq_len: int, tokenizer, skipped: Counter | dict | None = None, template: str = "") -> dict:
    """What goes into the run folder before training starts (data_report.json / .md)."""
    total = len(conversations)
    modes = Counter(conversation_mode(c) for c in conversations)
    check = check_system_prompts(conversations, tokenizer)
    custom = sum(1 for c in conversations if isinstance(c.kwargs.get("custom_instructions"), str)
                 and c.kwargs["custom_instructions"].strip())
    tokens = sum(len(e.ids) for e in examples)
    targets = sum(int(e.targets.sum()) for e in examples)
    return {
        "template": template,
        "conversations": total,
        "by_source": dict(Counter(c.source for c in conversations)),
        "modes": {m: modes.get(m, 0) for m in ("think", "no_think", "mixed")},
        "with_system_prompt": check["with_system_prompt"],
        "system_prompt_share": check["with_system_prompt"] / max(1, total),
        "system_prompt_rendered_share": check["system_prompt_rendered"] / max(1, total),
        "custom_instructions": custom,
        "skipped_bad_rows": dict(skipped or {}),
        "truncated": stats.get("truncated", 0),
        "dropped": stats.get("dropped_too_long", 0) + stats.get("dropped_no_target", 0),
        "dropped_too_long": stats.get("dropped_too_long", 0),
        "dropped_no_target": stats.get("dropped_no_target", 0),
        "examples": len(examples),
        "tokens": tokens,
        "target_tokens": targets,
        "assistant_token_share": targets / max(1, tokens),
        "tokens_by_source": stats.get("tokens_by_source", {}),
        "rows": len(rows),
        "seq_len": seq_len,
        "packing_efficiency": tokens / max(1, len(rows) * seq_len),
        "rendered_examples": _example_texts(conversations, tokenizer),
    }


def report_markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"
    modes = report["modes"]
    lines = [
        "## SFT data check",
        "",
        "| measure | value |",
        "|---|---|",
        f"| template | {report['template']} |",
        f"| conversations | {report['conversations']} ({', '.join(f'{k} {v}' for k, v in report['by_source'].items())}) |",
        f"| modes | think {modes['think']}, no_think {modes['no_think']}, mixed {modes['mixed']} |",
        f"| with a system prompt | {pct(report['system_prompt_share'])} |",
        f"| rendered text contains it | {pct(report['system_prompt_rendered_share'])} |",
        f"| custom_instructions present | {report['custom_instructions']} |",
        f"| bad rows skipped | {sum(report['skipped_bad_rows'].values())} {report['skipped_bad_rows'] or ''} |",
        f"| truncated / dropped | {report['truncated']} / {report['dropped']} |",
        f"| tokens (assistant share) | {report['tokens']} ({pct(report['assistant_token_share'])}) |",
        f"| tokens per source | {', '.join(f'{k} {v}' for k, v in report['tokens_by_source'].items())} |",
        (f"| rows x seq_len (packing efficiency) | {report['rows']} x {report['seq_len']} "
         f"({pct(report['packing_efficiency'])}) |"),
        "",
    ]
    for name, text in report["rendered_examples"].items():
        lines += [f"### Rendered example: {name}", "", "```", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the batch source


class PackedChatBatches:
    """Rows of whole conversations in a seeded order, reshuffled every epoch; resumable from two ints.

    Rank r of w takes global rows sequence + r, + r + w, ... (the pretraining loader's convention),
    so the state is in global rows and a run may resume under another data-parallel size."""

    stage = -1  # one stage: the Trainer's "before any data.stages" index

    def __init__(self, examples: list[Example], rows: list[list[int]], seq_len: int, micro_batch_size: int,
                 pad_id: int, seed: int = 0, dp_rank: int = 0, dp_world: int = 1):
        if not rows:
            raise DataError("no SFT rows to train on (every conversation was dropped)")
        self.examples, self.rows, self.seq_len = examples, rows, seq_len
        self.micro_batch_size, self.pad_id, self.seed = micro_batch_size, pad_id, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._sequence = 0
        self._order: tuple[int, list[int]] | None = None

    def _row_at(self, global_index: int) -> list[int]:
        epoch, position = divmod(global_index, len(self.rows))
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"sft/{self.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self.rows[self._order[1][position]]

    @property
    def epoch(self) -> float:
        return self._sequence / len(self.rows)

    def rows_per_epoch(self) -> int:
        return len(self.rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, L = self.micro_batch_size, self.seq_len
        input_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        labels = np.full((B, L), -100, dtype=np.int64)
        document_ids = np.zeros((B, L), dtype=np.int32)
        for b in range(B):
            row = self._row_at(self._sequence + self.dp_rank + self.dp_world * b)
            offset = 0
            for doc, i in enumerate(row):
                e = self.examples[i]
                n = len(e.ids)
                input_ids[b, offset : offset + n] = e.ids
                labels[b, offset : offset + n - 1] = np.where(e.targets[1:], e.ids[1:], -100)
                document_ids[b, offset : offset + n] = doc
                offset += n
            document_ids[b, offset:] = len(row)  # padding: a document of its own
        self._sequence += B * self.dp_world
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "document_ids": torch.from_numpy(document_ids)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "sequence": self._sequence, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"SFT data state version {state.get('version')} is not {STATE_VERSION}")
        if state["rows"] != len(self.rows):
            raise DataError(f"the checkpoint's SFT data had {state['rows']} rows, this data has {len(self.rows)}: "
                            "the data or its settings changed, so the run cannot resume exactly")
        self._sequence = int(state["sequence"])

    def skip(self, num_batches: int) -> None:
        self._sequence += num_batches * self.micro_batch_size * self.dp_world

    def set_stage(self, index: int) -> None:
        if index != -1:
            raise DataError("SFT data has one stage (data.stages do not apply to sft)")

    def close(self) -> None:
        pass


__all__ = [
    "Example",
    "PackedChatBatches",
    "check_system_prompts",
    "data_report",
    "one_per_row",
    "pack_best_fit",
    "report_markdown",
    "tokenize_conversations",
]
