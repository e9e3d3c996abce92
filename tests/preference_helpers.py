"""Preference pairs a tiny model can learn, and the model they start from, shared by the DPO tests:
prompts name a word, the chosen answer repeats it, the rejected one names another word."""

import json
from pathlib import Path

import torch

from smoltrain.config import config_from_dict
from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
from smoltrain.model.transformer import build_model
from smoltrain.train.load_model import save_model_folder

SHAPE = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_seq_len=64)
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three"]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randperm(len(WORDS), generator=g)[:2].tolist()
        rows.append({"prompt": f"say {WORDS[a]}:", "chosen": f" {WORDS[a]} {WORDS[a]}", "rejected": f" {WORDS[b]}"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_init_model(root: Path, name: str) -> Path:
    """root/tok (a 300-token BPE over WORDS) and root/NAME, a model folder of SHAPE (seed 5) that knows it."""
    save_tokenizer(train_tokenizer([" ".join(WORDS) + " say:"] * 40, 300, False), root / "tok")
    config = config_from_dict({"model": SHAPE, "data": {"seq_len": 32}, "train": {"micro_batch_size": 1, "global_batch_tokens": 32}})
    save_model_folder(build_model(config.model, seed=5), config, root / name, tokenizer=root / "tok")
    return root / name
