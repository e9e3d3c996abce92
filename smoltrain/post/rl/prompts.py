"""Prompts with reference answers for GRPO: the embedded arithmetic word problems (train / held-out
split), local GSM8K files (the eval adapter's reader), or any jsonl / json / parquet with `prompt`
(text) or `messages` (a conversation) and `answer`. Other columns travel to the reward functions.

Each prompt is a dict {"messages" | "prompt", "answer", "mode", ...}; `mode` (think / no_think) comes
from the row (`mode`, or `chat_template_kwargs.enable_thinking`), else from the run.
"""

from __future__ import annotations

from pathlib import Path

from smoltrain.errors import DataError

MODES = ("think", "no_think")


def _row_mode(row: dict, default: str, where: str) -> str:
    mode = row.get("mode")
    if mode is None and isinstance(row.get("chat_template_kwargs"), dict) and "enable_thinking" in row["chat_template_kwargs"]:
        mode = "think" if row["chat_template_kwargs"]["enable_thinking"] else "no_think"
    mode = default if mode is None else mode
    if mode not in MODES:
        raise DataError(f"{where}: mode must be think or no_think, got {mode!r}")
    return mode


def check_prompt(row, where: str, default_mode: str) -> dict:
    """One prompt row made uniform, or a DataError naming the place and what is missing."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' or 'messages' and 'answer', got {type(row).__name__}")
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError(f"{where}: the prompt has no 'answer' (GRPO needs a reference answer to score completions)")
    item = {k: v for k, v in row.items() if k != "chat_template_kwargs"}
    if "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        pass
    else:
        raise DataError(f"{where}: the row has neither a non-empty 'prompt' nor 'messages'")
    item["answer"] = str(answer)
    item["mode"] = _row_mode(row, default_mode, where)
    return item


def load_prompts(source: str, split: str = "train", mode: str = "no_think", count: int = 0, seed: int = 0,
                 dataset_split: str | None = None) -> list[dict]:
    """Prompts of one split ("train" or "heldout") from `source`: "embedded", "gsm8k:PATH", a file, or
    `dataset_split` of a dataset folder. count > 0 keeps the first `count` (the embedded source generates
    exactly that many)."""
    if mode not in MODES:
        raise DataError(f"mode must be think or no_think, got {mode!r}")
    if source == "embedded":
        from smoltrain.post.embedded import arithmetic_prompts

        rows = arithmetic_prompts("heldout" if split == "heldout" else "train", count or 1000, seed, mode)
        items = [check_prompt({k: v for k, v in row.items() if k != "steps"}, f"embedded:{i}", mode)
                 for i, row in enumerate(rows)]
    elif source.startswith("gsm8k:"):
        items = _gsm8k_prompts(Path(source.removeprefix("gsm8k:")), "test" if split == "heldout" else "train", mode)
    else:
        items = _file_prompts(Path(source), mode, dataset_split)
    return items[:count] if count > 0 else items


def _gsm8k_prompts(path: Path, split: str, mode: str) -> list[dict]:
    from smoltrain.eval.adapters import data_files, gsm8k, read_rows

    files = data_files(path, split)
    if not files:
        raise DataError(f"{path}: no GSM8K {split} files")
    items = []
    for file in files:
        for number, row in enumerate(read_rows(file), start=1):
            where = f"{file}:{number}"
            try:
                answer, question = gsm8k(row, where)["answer"], row["question"]
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: not a GSM8K row ({type(e).__name__}: {e})") from None
            items.append(check_prompt({"messages": [{"role": "user", "content": question}], "answer": answer}, where, mode))
    if not items:
        raise DataError(f"{path}: no GSM8K prompts in the {split} files")
    return items


def _file_prompts(path: Path, mode: str, dataset_split: str | None = None) -> list[dict]:
    from smoltrain.data.readers import dataset_rows, is_dataset_folder
    from smoltrain.eval.adapters import read_rows

    if is_dataset_folder(path):
        rows = list(dataset_rows(path, dataset_split))
    elif not path.is_file():
        raise DataError(f"{path}: no such prompt file or dataset folder (or use 'embedded' or 'gsm8k:PATH')")
    else:
        rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no prompts in the file")
    return [check_prompt(row, f"{path}:{number}", mode) for number, row in enumerate(rows, start=1)]


def encode(tokenizer, item: dict) -> list[int]:
    """Token ids a model continues: a conversation through the chat template with its mode's
    generation prompt; a text prompt as it is (TRL's "standard" format)."""
    if "messages" in item:
        from smoltrain.post.chat.template import encode_prompt

        return encode_prompt(tokenizer, item["messages"], enable_thinking=item["mode"] == "think")
    return list(tokenizer(item["prompt"], add_special_tokens=False)["input_ids"])


def reward_columns(items: list[dict], num_generations: int) -> dict[str, list]:
    """The dataset columns a reward function receives, each value repeated for the prompt's G completions."""
    names = sorted({k for item in items for k in item if k not in ("prompt", "messages")})
    return {name: [item.get(name) for item in items for _ in range(num_generations)] for name in names}


__all__ = ["MODES", "check_prompt", "encode", "load_prompts", "reward_columns"]
