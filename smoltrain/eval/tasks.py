"""Evaluation tasks: the task-file format, its validation, few-shot sampling and prompt building.

A task file is JSON lines, one item per line: `{"query", "choices", "gold"}` for log-likelihood
multiple choice or `{"query", "answer"}` for generation. Few-shot examples are drawn per item
from a generator keyed by (seed, task, item index), so an item's prompt never depends on
`--limit`, batching or which other items are evaluated.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from smoltrain.errors import DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_STOP = ("\n",)  # generation stops at the end of the answer line unless the item says otherwise


@dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generative"]
    items: list[dict]
    # Examples for few-shot prompts; empty: the task's other items (never the item itself).
    fewshot_pool: list[dict] = field(default_factory=list)
    formulation: Literal["cloze", "mcf"] = "cloze"  # mcf: lettered choices, scores " A", " B", ...
    num_fewshot: int = 0
    fewshot_sep: str = "\n\n"
    main_metric: str | None = None  # what the aggregate uses; None: the kind's default
    random_baseline: float | None = None  # None: computed from the items (1 / number of choices)
    max_new_tokens: int = 64  # generative
    num_samples: int = 1  # generative: k > 1 samples per item for pass@k / avg@k
    temperature: float = 0.0  # generative: 0 is greedy; sampling defaults to 0.8 when num_samples > 1

    @property
    def metric(self) -> str:
        if self.main_metric:
            return self.main_metric
        if self.kind == "generative":
            return f"pass@{self.num_samples}" if self.num_samples > 1 else "quasi_exact_match"
        # Letters all have the same length, so normalising only matters for cloze answers.
        return "acc" if self.formulation == "mcf" else "acc_norm_nospace"

    @property
    def baseline(self) -> float:
        if self.random_baseline is not None:
            return self.random_baseline
        if self.kind == "generative" or not self.items:
            return 0.0
        return sum(1.0 / len(item["choices"]) for item in self.items) / len(self.items)

    def limited(self, limit: int | None) -> "Task":
        """The first `limit` items; the few-shot pool stays whole so prompts do not change."""
        if limit is None or limit >= len(self.items):
            return self
        pool = self.fewshot_pool or self.items
        return dataclasses.replace(self, items=self.items[:limit], fewshot_pool=pool)


# ----------------------------------------------------------------------------- items


def validate_item(raw, where: str) -> dict:
    """Check one item and return it normalised; errors name `where` (file:line)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    query = raw.get("query")
    if not isinstance(query, str):
        raise DataError(f"{where}: 'query' must be a string")
    has_choices, has_answer = "choices" in raw, "answer" in raw
    if has_choices == has_answer:
        raise DataError(f"{where}: an item has either 'choices' and 'gold' (multiple choice) or 'answer' (generative)")
    item = dict(raw)
    if has_choices:
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice:
                raise DataError(f"{where}: choices[{i}] must be a non-empty string")
        gold = raw.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise DataError(f"{where}: 'gold' must be an integer index into 'choices'")
        if not 0 <= gold < len(choices):
            raise DataError(f"{where}: gold {gold} is out of range for {len(choices)} choices")
    else:
        if not isinstance(raw["answer"], str):
            raise DataError(f"{where}: 'answer' must be a string")
        stop = raw.get("stop", list(DEFAULT_STOP))
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise DataError(f"{where}: 'stop' must be a list of non-empty strings")
        item["stop"] = stop
    for key in ("fewshot_target", "question", "instruction"):
        if key in raw and not isinstance(raw[key], str):
            raise DataError(f"{where}: '{key}' must be a string")
    if "fewshot" in raw:
        pool = raw["fewshot"]
        if not isinstance(pool, list):
            raise DataError(f"{where}: 'fewshot' must be a list of example items")
        item["fewshot"] = [validate_item(example, f"{where}: fewshot[{i}]") for i, example in enumerate(pool)]
    return item


def item_kind(item: dict) -> str:
    return "multiple_choice" if "choices" in item else "generative"


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_task_file(path: str | Path, name: str | None = None) -> Task:
    """Load and validate a JSON-lines task file; any bad line is a DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: task file not found")
    items: list[dict] = []
    kind = None
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                item = validate_item(raw, where)
                if kind is None:
                    kind = item_kind(item)
                elif item_kind(item) != kind:
                    raise DataError(f"{where}: mixes {item_kind(item)} and {kind} items in one task file")
                items.append(item)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    if not items:
        raise DataError(f"{path}: no items (expected one JSON object per line)")
    stem = path.name.split(".")[0]
    return Task(name=name or stem, kind=kind, items=items)


# ----------------------------------------------------------------------------- formulations


def to_mcf(item: dict) -> dict:
    """Lettered multiple choice: list the choices under the question and score " A", " B", ...

    Uses the item's raw `question` when the source gave one (the cloze `query` usually ends in
    "Answer:"), and its `instruction` header (MMLU's subject line) when present.
    """
    if len(item["choices"]) > len(LETTERS):
        raise DataError(f"item {item.get('id', item['query'][:40])!r}: too many choices for lettered multiple choice")
    question = item.get("question", item["query"]).rstrip()
    lines = [f"{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(item["choices"])]
    prompt = question + "\n" + "\n".join(lines) + "\nAnswer:"
    if item.get("instruction"):
        prompt = item["instruction"].rstrip() + "\n\n" + prompt
    letters = [f" {LETTERS[i]}" for i in range(len(item["choices"]))]
    out = {k: v for k, v in item.items() if k not in ("fewshot_target", "fewshot")}
    out.update(query=prompt, choices=letters)
    if "fewshot" in item:
        out["fewshot"] = [to_mcf(example) for example in item["fewshot"]]
    return out


def fewshot_target(item: dict) -> str:
    """What follows the query when the item is shown as a solved example."""
    if "fewshot_target" in item:
        return item["fewshot_target"]
    if "choices" in item:
        return item["choices"][item["gold"]]
    answer = item["answer"]
    # Keep one space between "Answer:" and the answer, as a cloze target would have.
    return answer if answer[:1].isspace() or item["query"][-1:].isspace() else " " + answer


# ----------------------------------------------------------------------------- few-shot


def fewshot_indices(pool_size: int, k: int, seed: int, task_name: str, index: int, exclude: Sequence[int] = ()) -> list[int]:
    """k distinct pool indices for item `index`, a pure function of its arguments."""
    if k <= 0:
        return []
    excluded = set(exclude)
    candidates = [i for i in range(pool_size) if i not in excluded]
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes.
    rng = random.Random(f"{seed}/{task_name}/{index}")
    return rng.sample(candidates, min(k, len(candidates)))


def _same_item(a: dict, b: dict) -> bool:
    if "id" in a and "id" in b:
        return a["id"] == b["id"]
    return a["query"] == b["query"]


def fewshot_examples(task: Task, index: int, seed: int) -> list[dict]:
    """The solved examples shown before item `index`: from the item's own pool, the task's pool,
    or else the task's other items; the item itself is never among them."""
    item = task.items[index]
    if "fewshot" in item:
        pool = item["fewshot"]
    elif task.fewshot_pool:
        pool = task.fewshot_pool
    else:
        pool = task.items
    if item.get("instruction") and any(example.get("instruction") == item["instruction"] for example in pool):
        pool = [example for example in pool if example.get("instruction") == item["instruction"]]  # MMLU: same subject
    exclude = [i for i, example in enumerate(pool) if example is item or _same_item(example, item)]
    chosen = fewshot_indices(len(pool), task.num_fewshot, seed, task.name, index, exclude)
    return [pool[i] for i in chosen]


def build_prompt(task: Task, index: int, seed: int = 0) -> tuple[str, dict]:
    """(context string, the item in the task's formulation) for item `index`."""
    item = task.items[index]
    shots = fewshot_examples(task, index, seed)
    if task.formulation == "mcf" and task.kind == "multiple_choice":
        item = to_mcf(item)
        shots = [to_mcf(shot) for shot in shots]
    parts = [shot["query"] + fewshot_target(shot) for shot in shots]
    return task.fewshot_sep.join(parts + [item["query"]]), item
