"""Published benchmark layouts -> our task format, with the prompts lighteval uses for them.

Each adapter reads the files as their Hugging Face datasets publish them (parquet or jsonl, one
folder per config with `<split>-*.parquet`) and the original releases where they differ (ARC,
OpenBookQA and CommonsenseQA nest the choices under "question"; PIQA keeps labels in a .lst
file; MMLU ships header-less CSVs). Cloze prompts follow the SmolLM/FineWeb evaluation suite.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path
from typing import Callable

from smoltrain.errors import DataError
from smoltrain.eval.tasks import Task, validate_item

DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".csv")
SPLIT_ALIASES = {
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
    "train": ("train",),
    "dev": ("dev",),
}


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[dict]:
    """Rows of one data file (parquet, jsonl, jsonl.gz, json list, or MMLU's header-less csv)."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return [{"_csv": row, "_file": name} for row in csv.reader(f)]
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of records")
        return rows
    opener = gzip.open if name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return rows


def _tokens(path: Path) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", path.name.lower()))


def data_files(path: Path, split: str) -> list[Path]:
    """The files of one split inside a dataset folder (a file is taken as it is)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    aliases = SPLIT_ALIASES.get(split, (split,))
    return [p for p in files if _tokens(p) & set(aliases) or any(part in aliases for part in p.relative_to(path).parts[:-1])]


def _letter_index(key, labels: list[str], where: str) -> int:
    key = str(key).strip()
    if key not in labels:
        raise DataError(f"{where}: answer {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _question_and_choices(row: dict, where: str) -> tuple[str, list[str], list[str]]:
    """ARC / OpenBookQA / CommonsenseQA, flat (Hugging Face) or nested (original release)."""
    question = row.get("question_stem", row.get("question"))
    choices = row.get("choices")
    if isinstance(question, dict):  # original release: {"question": {"stem", "choices": [{"text", "label"}]}}
        choices = question.get("choices")
        question = question.get("stem")
    if isinstance(choices, list):
        choices = {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}
    if not isinstance(question, str) or not isinstance(choices, dict):
        raise DataError(f"{where}: expected 'question' and 'choices' with 'text' and 'label'")
    return question, list(choices["text"]), [str(label) for label in choices["label"]]


# ----------------------------------------------------------------------------- layouts


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict, where: str) -> dict | None:
    if str(row.get("label", "")) == "":
        return None  # the test split is unlabelled
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": _hellaswag_text(row["activity_label"] + ": " + context),
        "question": _hellaswag_text(context),
        "choices": [" " + _hellaswag_text(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def arc(row: dict, where: str) -> dict:
    question, texts, labels = _question_and_choices(row, where)
    return {
        "id": row.get("id"),
        "query": f"Question: {question}\nAnswer:",
        "question": question,
        "choices": [" " + t for t in texts],
        "gold": _letter_index(row["answerKey"], labels, where),
    }


def openbookqa(row: dict, where: str) -> dict:
    question, texts, labels = _question_and_choices(row, where)
    return {
        "id": row.get("id"),
        "query": question,
        "question": question,
        "choices": [" " + t for t in texts],
        "gold": _letter_index(row["answerKey"], labels, where),
    }


def commonsense_qa(row: dict, where: str) -> dict | None:
    if not row.get("answerKey"):
        return None  # the test split is unlabelled
    return arc(row, where)


def piqa(row: dict, where: str) -> dict | None:
    if row.get("label") in (None, "", -1):
        return None
    return {
        "query": f"Question: {row['goal']}\nAnswer:",
        "question": row["goal"],
        "choices": [" " + row["sol1"], " " + row["sol2"]],
        "gold": int(row["label"]),
    }


def winogrande(row: dict, where: str) -> dict | None:
    if str(row.get("answer", "")) == "":
        return None
    sentence = row["sentence"]
    if sentence.count("_") != 1:
        raise DataError(f"{where}: a WinoGrande sentence has exactly one '_' blank")
    # Partial scoring: the options change the context, the rest of the sentence is what we score.
    before, after = sentence.split("_")
    after = after.strip()
    return {
        "id": row.get("qID"),
        "query": before,
        "question": sentence,
        "choices": [f"{row['option1']} {after}", f"{row['option2']} {after}"],
        "gold": int(row["answer"]) - 1,
    }


def mmlu(row: dict, where: str) -> dict:
    if "_csv" in row:  # original release: question, A, B, C, D, answer letter; subject from the file name
        cells = row["_csv"]
        if len(cells) != 6:
            raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(cells)}")
        subject = re.sub(r"_(test|dev|val)$", "", row["_file"].rsplit(".", 1)[0])
        question, choices, gold = cells[0], cells[1:5], _letter_index(cells[5], list("ABCD"), where)
    else:
        subject, question, choices, gold = row.get("subject", ""), row["question"], list(row["choices"]), int(row["answer"])
    item = {
        "query": f"Question: {question}\nAnswer:",
        "question": question,
        "choices": [" " + str(c) for c in choices],
        "gold": gold,
    }
    if subject:
        item["instruction"] = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
    return item


def gsm8k(row: dict, where: str) -> dict:
    solution = row["answer"]
    if "####" not in solution:
        raise DataError(f"{where}: a GSM8K answer ends in '#### <number>'")
    final = solution.split("####")[-1].strip().replace(",", "")
    return {
        "query": f"Question: {row['question']}\nAnswer:",
        "answer": final,
        "extract": "last_number",  # the model writes a worked solution; its last number is the answer
        "stop": ["\n\n", "Question:"],
        "fewshot_target": " " + solution,
    }


# name -> (row converter, default evaluation split, few-shot split, task settings)
ADAPTERS: dict[str, tuple[Callable[[dict, str], dict | None], str, str, dict]] = {
    "hellaswag": (hellaswag, "validation", "train", {}),
    "arc": (arc, "test", "train", {}),
    "piqa": (piqa, "validation", "train", {}),
    "winogrande": (winogrande, "validation", "train", {}),
    "openbookqa": (openbookqa, "test", "train", {}),
    "commonsense_qa": (commonsense_qa, "validation", "train", {}),
    "mmlu": (mmlu, "test", "dev", {}),
    "gsm8k": (gsm8k, "test", "train", {"max_new_tokens": 256}),
}
ALIASES = {"arc_easy": "arc", "arc_challenge": "arc", "csqa": "commonsense_qa", "obqa": "openbookqa"}


def adapter_for(name: str) -> str | None:
    """The adapter a task name uses (`arc_easy` -> `arc`, `mmlu_anatomy` -> `mmlu`), or None."""
    if name in ADAPTERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    prefix = name.split("_")[0]
    return prefix if prefix in ("mmlu", "hellaswag", "gsm8k") else None


def _convert(adapter: str, files: list[Path], where: str) -> list[dict]:
    convert = ADAPTERS[adapter][0]
    items = []
    for path in files:
        rows = read_rows(path)
        labels = _piqa_labels(path) if adapter == "piqa" else None
        for number, row in enumerate(rows, start=1):
            at = f"{path}:{number}"
            if labels is not None and "label" not in row:
                row = {**row, "label": labels[number - 1] if number <= len(labels) else None}
            try:
                item = convert(row, at)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise DataError(f"{at}: not in the {adapter} layout ({type(e).__name__}: {e})") from None
            if item is not None:
                items.append(validate_item({k: v for k, v in item.items() if v is not None}, at))
    return items


def _piqa_labels(path: Path) -> list[int] | None:
    # The original PIQA release keeps labels beside the data: valid.jsonl + valid-labels.lst.
    stem = path.name.split(".")[0]
    labels = path.with_name(f"{stem}-labels.lst")
    if not labels.is_file():
        return None
    return [int(line) for line in labels.read_text().split()]


def load_adapter_task(name: str, path: str | Path, split: str | None = None, num_fewshot: int = 0) -> Task:
    """A Task named `name` from a published file or dataset folder (`split` picks files in a folder;
    with few-shot, the folder's train split, or MMLU's dev split, is the example pool)."""
    adapter = adapter_for(name)
    if adapter is None:
        raise DataError(f"no adapter for task {name!r} (known: {', '.join(sorted(ADAPTERS))})")
    _, eval_split, fewshot_split, settings = ADAPTERS[adapter]
    path = Path(path)
    files = data_files(path, split or eval_split)
    if not files:
        raise DataError(f"{path}: no {split or eval_split} files ({', '.join(DATA_SUFFIXES)}) for {name}")
    items = _convert(adapter, files, str(path))
    if not items:
        raise DataError(f"{path}: no labelled {name} items")
    pool = _convert(adapter, data_files(path, fewshot_split), str(path)) if path.is_dir() and num_fewshot > 0 else []
    kind = "generative" if adapter == "gsm8k" else "multiple_choice"
    return Task(name=name, kind=kind, items=items, fewshot_pool=pool, num_fewshot=num_fewshot, **settings)
