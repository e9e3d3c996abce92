"""SFT data: conversations -> token ids and loss targets (from the template's generation mask),
best-fit-decreasing packing into rows, the data check and report, and the batch source. (Preparing
them on disk for a run, in parallel and cached, is post/sft/prepare.py's; these are its parts.)

A packed row holds whole conversations, each with its own document id, so positions restart and no
token attends across conversations (the model's document masking): a packed conversation gets the
logits it would get alone. Packing never splits a conversation; one longer than a row is truncated
(its start kept) or dropped. The data check renders every conversation that has a system prompt and
stops when the text lacks it: the bug that cost SmolLM3's SFT every system prompt cannot pass.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from smoltrain.errors import DataError
from smoltrain.post.chat.data import Conversation, conversation_mode, system_prompt
from smoltrain.post.chat.template import encode_chat, render

STATE_VERSION = 1


@dataclass
class Example:
    ids: np.ndarray  # int64 token ids of the rendered conversation
    targets: np.ndarray  # bool: token j is predicted (a label) from token j-1
    source: str
    index: int  # position in the conversation list


OUTCOMES = ("kept", "truncated", "dropped_too_long", "dropped_no_target")


def check_settings(loss: str, overflow: str) -> None:
    if loss not in ("assistant", "all"):
        raise DataError(f"sft.loss must be assistant or all, got {loss!r}")
    if overflow not in ("truncate", "drop"):
        raise DataError(f"sft.overflow must be truncate or drop, got {overflow!r}")


def fit_example(ids, mask, seq_len: int, loss: str, overflow: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, targets, outcome) of one encoded conversation in a row of seq_len; outcome is one of
    OUTCOMES (the dropped ones come with empty arrays)."""
    ids = np.asarray(ids, dtype=np.int64)
    targets = np.asarray(mask, dtype=bool) if loss == "assistant" else np.ones(len(ids), dtype=bool)
    targets[0] = False  # nothing predicts the first token
    outcome = "kept"
    if len(ids) > seq_len:
        if overflow == "drop":
            return ids[:0], targets[:0], "dropped_too_long"
        ids, targets, outcome = ids[:seq_len], targets[:seq_len], "truncated"
    if not targets.any():  # truncated before the first assistant token, or no assistant token at all
        return ids[:0], targets[:0], "dropped_no_target"
    return ids, targets, outcome


def tokenize_conversations(conversations: list[Conversation], tokenizer, seq_len: int, loss: str = "assistant",
                           overflow: str = "truncate") -> tuple[list[Example], dict]:
    """In memory, one conversation at a time: the examples that fit a row of seq_len and the counts of
    each outcome. `smoltrain sft` prepares on disk (post/sft/prepare.py); this is the small-list path."""
    check_settings(loss, overflow)
    examples, stats = [], Counter()
    for index, conv in enumerate(conversations):
        ids, targets, outcome = fit_example(*encode_chat(tokenizer, conv.messages, **conv.kwargs), seq_len, loss, overflow)
        stats[outcome] += 1
        if len(ids):
            examples.append(Example(ids, targets, conv.source, index))
    return examples, dict(stats)


# ----------------------------------------------------------------------------- packing


@dataclass
class PackingPlan:
    """Rows of example indices as two flat arrays (8 bytes per example, not a Python list per row):
    row j holds items[offsets[j]:offsets[j + 1]]."""

    items: np.ndarray  # int64
    offsets: np.ndarray  # int64, rows + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.items[self.offsets[row] : self.offsets[row + 1]]

    def to_lists(self) -> list[list[int]]:
        return [self[j].tolist() for j in range(len(self))]

    @classmethod
    def from_rows(cls, rows: list[list[int]]) -> "PackingPlan":
        sizes = np.array([len(r) for r in rows], dtype=np.int64)
        items = np.array([i for r in rows for i in r], dtype=np.int64)
        return cls(items, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def pack_best_fit(lengths, capacity: int) -> PackingPlan:
    """Best-fit decreasing: longest first (ties: lower index), each into the open row with the least
    room that fits it (ties: the older row), a new row when none does; no item is split.

    Open rows wait in one min-heap per free-token count, and a boolean array of the non-empty counts
    finds the tightest one with one numpy scan: 1M conversations pack in seconds and the rows are
    two int64 arrays (a list of lists took ~70 bytes per item)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > capacity):
        raise ValueError(f"every length must lie in [1, {capacity}]")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    row_of = np.empty(len(lengths), dtype=np.int64)
    waiting: dict[int, list[int]] = {}  # free tokens -> heap of row indices
    open_room = np.zeros(capacity + 1, dtype=bool)
    rows = 0
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        free = n + int(np.argmax(open_room[n:]))
        if open_room[free]:
            row = heapq.heappop(waiting[free])
            if not waiting[free]:
                open_room[free] = False
        else:
            row, free, rows = rows, capacity, rows + 1
        row_of[i] = row
        free -= n
        if free > 0:
            heapq.heappush(waiting.setdefault(free, []), row)
            open_room[free] = True
    rank = np.empty(len(lengths), dtype=np.int64)
    rank[order] = np.arange(len(lengths))
    items = np.lexsort((rank, row_of))  # by row, in the order items went in
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))]).astype(np.int64)
    return PackingPlan(items.astype(np.int64), offsets)


def one_per_row(lengths) -> PackingPlan:
    n = len(lengths)
    return PackingPlan(np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64))


# ----------------------------------------------------------------------------- the data check and report


class ChatCounts:
    """The data report's counts over a stream of conversations (per file in the preparation workers,
    then merged in file order). `add` is also the data check: a system prompt missing from its
    rendered chat stops here, naming the conversation."""

    def __init__(self):
        self.by_source: Counter = Counter()
        self.modes: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.with_system_prompt = 0
        self.custom_instructions = 0
        self.rendered_examples: dict[str, str] = {}  # the first of each mode without a system prompt, one with

    def add(self, conv: Conversation, text: str, outcome: str) -> None:
        self.by_source[conv.source] += 1
        mode = conversation_mode(conv)
        self.modes[mode] += 1
        self.outcomes[outcome] += 1
        instructions = conv.kwargs.get("custom_instructions")
        self.custom_instructions += isinstance(instructions, str) and bool(instructions.strip())
        prompt = system_prompt(conv)
        if prompt is not None:
            self.with_system_prompt += 1
            if prompt not in text:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise DataError(f"{conv.where or 'conversation ' + str(conv)}: its system prompt {short!r} is not in the "
                                "rendered chat (the template dropped it: the SmolLM3 SFT bug); choose a template that "
                                "renders system prompts (smollm3)" + (", or set sft.instructions_as_system: true to move "
                                "custom_instructions into a system message" if "custom_instructions" in conv.kwargs else ""))
            self.rendered_examples.setdefault("system_prompt", text)
        elif mode in ("think", "no_think"):
            self.rendered_examples.setdefault(mode, text)

    def to_dict(self) -> dict:
        return {"by_source": dict(self.by_source), "modes": dict(self.modes), "outcomes": dict(self.outcomes),
                "with_system_prompt": self.with_system_prompt, "custom_instructions": self.custom_instructions,
                "rendered_examples": self.rendered_examples}

    def merge(self, counts: dict) -> None:
        self.by_source.update(counts["by_source"])
        self.modes.update(counts["modes"])
        self.outcomes.update(counts["outcomes"])
        self.with_system_prompt += counts["with_system_prompt"]
        self.custom_instructions += counts["custom_instructions"]
        for name, text in counts["rendered_examples"].items():
            self.rendered_examples.setdefault(name, text)

    @classmethod
    def of(cls, conversations: list[Conversation], tokenizer, stats: dict | None = None) -> "ChatCounts":
        """The counts of an in-memory list (each conversation rendered once more; outcomes from stats)."""
        counts = cls()
        for conv in conversations:
            counts.add(conv, render(tokenizer, conv.messages, **conv.kwargs), "kept")
        counts.outcomes = Counter(stats or {})
        return counts


def check_system_prompts(conversations: list[Conversation], tokenizer) -> dict:
    """Counts of conversations with a system prompt and of those whose rendered text contains it;
    DataError naming the first conversation whose prompt was lost (the two counts must be equal)."""
    counts = ChatCounts.of(conversations, tokenizer)
    return {"with_system_prompt": counts.with_system_prompt, "system_prompt_rendered": counts.with_system_prompt}


def trained_shares(sources: list[str], example_source: np.ndarray, lengths: np.ndarray, targets: np.ndarray,
                   items: np.ndarray) -> dict[str, dict]:
    """Per source, what one epoch of the plan trains on: its conversations (plan items, a repeated
    conversation counted each time), tokens and label tokens, and their shares of the totals."""
    count = np.bincount(example_source[items], minlength=len(sources))
    tokens = np.bincount(example_source[items], weights=lengths[items], minlength=len(sources))
    labels = np.bincount(example_source[items], weights=targets[items], minlength=len(sources))
    total_count, total_tokens = max(1, int(count.sum())), max(1, int(tokens.sum()))
    return {name: {"conversations": int(count[k]), "tokens": int(tokens[k]), "target_tokens": int(labels[k]),
                   "conversation_share": int(count[k]) / total_count, "token_share": int(tokens[k]) / total_tokens}
            for k, name in enumerate(sources)}


def data_report(counts: ChatCounts, trained: dict[str, dict], rows: int, seq_len: int,
                skipped: Counter | dict | None = None, template: str = "") -> dict:
    """What goes into the run folder before training starts (data_report.json / .md): the counts of
    every conversation read and the shares of one epoch of the packed plan (`trained_shares`)."""
    total = sum(counts.by_source.values())
    tokens = sum(t["tokens"] for t in trained.values())
    targets = sum(t["target_tokens"] for t in trained.values())
    outcomes = counts.outcomes
    return {
        "template": template,
        "conversations": total,
        "by_source": dict(counts.by_source),
        "modes": {m: counts.modes.get(m, 0) for m in ("think", "no_think", "mixed")},
        "with_system_prompt": counts.with_system_prompt,
        "system_prompt_share": counts.with_system_prompt / max(1, total),
        "system_prompt_rendered_share": counts.with_system_prompt / max(1, total),  # add() stops on a lost one
        "custom_instructions": counts.custom_instructions,
        "skipped_bad_rows": dict(skipped or {}),
        "truncated": outcomes.get("truncated", 0),
        "dropped": outcomes.get("dropped_too_long", 0) + outcomes.get("dropped_no_target", 0),
        "dropped_too_long": outcomes.get("dropped_too_long", 0),
        "dropped_no_target": outcomes.get("dropped_no_target", 0),
        "examples": sum(t["conversations"] for t in trained.values()),
        "tokens": tokens,
        "target_tokens": targets,
        "assistant_token_share": targets / max(1, tokens),
        "tokens_by_source": {name: t["tokens"] for name, t in trained.items()},
        "sources": trained,
        "rows": rows,
        "seq_len": seq_len,
        "packing_efficiency": tokens / max(1, rows * seq_len),
        "rendered_examples": dict(counts.rendered_examples),
    }


def report_markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"
    modes = report["modes"]
    shares = ", ".join(f"{name} {pct(t['conversation_share'])} / {pct(t['token_share'])}"
                       for name, t in report.get("sources", {}).items())
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
        f"| share of conversations / tokens trained | {shares} |",
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

    `examples[i]` gives an Example (a list in memory, or ShardExamples reading the prepared shards
    with pread); `rows` is a PackingPlan (or a list of index lists). Rank r of w takes global rows
    sequence + r, + r + w, ... (the pretraining loader's convention), so the state is in global rows
    and a run may resume under another data-parallel size."""

    stage = -1  # one stage: the Trainer's "before any data.stages" index

    def __init__(self, examples, rows: PackingPlan | list[list[int]], seq_len: int, micro_batch_size: int,
                 pad_id: int, seed: int = 0, dp_rank: int = 0, dp_world: int = 1):
        if not len(rows):
            raise DataError("no SFT rows to train on (every conversation was dropped)")
        self.examples, self.seq_len = examples, seq_len
        self.rows = rows if isinstance(rows, PackingPlan) else PackingPlan.from_rows(rows)
        self.micro_batch_size, self.pad_id, self.seed = micro_batch_size, pad_id, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._sequence = 0
        self._order: tuple[int, np.ndarray] | None = None

    def _row_at(self, global_index: int) -> np.ndarray:
        epoch, position = divmod(global_index, len(self.rows))
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"sft/{self.seed}/{epoch}").shuffle(order)
            self._order = (epoch, np.array(order, dtype=np.int64))  # 8 bytes a row, not a list's ~36
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
    "OUTCOMES",
    "ChatCounts",
    "Example",
    "PackedChatBatches",
    "PackingPlan",
    "check_settings",
    "check_system_prompts",
    "data_report",
    "fit_example",
    "one_per_row",
    "pack_best_fit",
    "report_markdown",
    "tokenize_conversations",
    "trained_shares",
]
