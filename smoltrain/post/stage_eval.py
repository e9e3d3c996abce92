"""What every post-training stage evaluates the same way: the chat evals (with the vibe test's replies to
read), and the starting model scored once before step 1, the "before" column its report compares against.

Every rank runs the same chat forwards (a sharded model's forward gathers weights from all of them); the
main rank writes. The starting model is scored only on a fresh run from train.init, and only once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smoltrain.files import write_atomic
from smoltrain.model.modes import evaluating

CHAT_BEFORE, CHAT_AFTER = "chat_before.json", "chat_after.json"


def run_chat_evals(model: nn.Module, tokenizer, items: int | None = None, seed: int = 0, vibe: bool = False,
                   vibe_new_tokens: int = 160, **settings) -> dict:
    """{"chat": the chat evals (accuracy in both modes, rule adherence, think format, stop rate, each with
    its standard error) of `items` held-out items per set (None: chat_evals' defaults)} plus, with vibe,
    {"vibe": the vibe test's replies}; in eval mode, the model's mode restored after. settings: chat_evals'
    own (think_count, max_new_tokens, think_max_new_tokens, per_item)."""
    from smoltrain.post.chat.evals import chat_evals, vibe_test

    base = getattr(model, "_orig_mod", model)
    counts = {} if items is None else {"count": items, "persona_count": items}
    with evaluating(base), torch.no_grad():
        record = {"chat": chat_evals(base, tokenizer, seed=seed, **counts, **settings)}
        if vibe:
            record["vibe"] = vibe_test(base, tokenizer, max_new_tokens=vibe_new_tokens)
    return record


def write_record(path: Path, record: dict) -> None:
    write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def evaluate_start(run_dir: Path, name: str, evaluate: Callable[[], dict], init: str | None, is_main: bool) -> dict | None:
    """The starting model's score: `evaluate()` at the weights the Trainer built from train.init, written
    to run_dir/name by the main rank. None (nothing run) without train.init, on resume, or when the
    file is there already (a run stopped before its first checkpoint)."""
    path = Path(run_dir) / name
    if not init or (Path(run_dir) / "checkpoints" / "latest").is_file() or path.is_file():
        return None
    result = evaluate()
    if is_main:
        write_record(path, result)
    return result


__all__ = ["CHAT_AFTER", "CHAT_BEFORE", "evaluate_start", "run_chat_evals", "write_record"]
