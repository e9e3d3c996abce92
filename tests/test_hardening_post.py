"""Round 2 of hardening (issue 24), post-training a real model as a new user would: explicit steps win
over SFT's derived ones, inputs are checked before step 1, finished runs say so, and more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chat_helpers import VOCAB, chat_tokenizers, conversations

from smoltrain import cli
from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.model.hf import save_model_folder
from smoltrain.model.transformer import build_model
from smoltrain.post.chat_data import write_conversations
from smoltrain.post.sft import load_sft_config

SEQ = 128
MODEL = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_seq_len": SEQ, "nope_every": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = chat_tokenizers(tmp_path_factory.mktemp("hardening_post"))
    config = Config(model=ModelConfig(**MODEL), data=DataConfig(seq_len=SEQ))
    save_model_folder(build_model(config.model, seed=3), config, root / "init", tokenizer=root / "base")
    write_conversations(root / "chat.jsonl", conversations(24))
    return root


def sft_recipe(root: Path, out: Path, **train_keys) -> dict:
    """SFT's own defaults for sft.epochs (2) and sft.warmup_fraction (0.03): the recipe leaves them out."""
    return {
        "data": {"seq_len": SEQ},
        "sft": {"data": [str(root / "chat.jsonl")], "chat_eval_items": 0},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"init": str(root / "init"), "out_dir": str(out), "log_every": 1, "save_every": 100,
                  "eval_every": 1000, "global_batch_tokens": 2 * SEQ, "micro_batch_size": 2, "tensorboard": False,
                  "device": "cpu", "compile": "off", "precision": "fp32", **train_keys},
        "eval": {"val_batches": 0},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_explicit_max_steps_wins_over_sfts_epochs_in_the_run_and_in_smoltrain_config(root, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sft_recipe(root, tmp_path / "run", max_steps=3))
    config = load_sft_config(path, ["optim.warmup_steps=1"])
    assert (config.sft.epochs, config.train.max_steps, config.sft.warmup_fraction, config.optim.warmup_steps) == (None, 3, None, 1)
    derived = load_sft_config(write_recipe(tmp_path / "d.yaml", sft_recipe(root, tmp_path / "run")))
    assert (derived.sft.epochs, derived.sft.warmup_fraction) == (2.0, 0.03)  # nothing given: SFT derives them

    assert cli.main(["config", str(path)]) == 0
    printed = capsys.readouterr().out
    shown = yaml.safe_load(printed)
    assert shown["train"]["max_steps"] == 3 and shown["sft"]["epochs"] is None
    assert shown["optim"]["lr"] == 3e-3 and shown["optim"]["grad_clip"] == 0.2  # SFT's defaults, as the run has them
    assert "train.max_steps 3 as given (sft.epochs not used)" in printed

    assert cli.main(["sft", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps 3 as given" in out
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3
