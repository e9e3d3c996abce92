"""The demo: its unigram baseline against a brute-force count, and the whole pipeline end to end
on a tiny recipe (a few percent of the embedded corpus, a model of a few thousand parameters)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from smoltrain.cli import main
from smoltrain.config import DataConfig
from smoltrain.data.shards import ShardWriter, shard_name, token_dtype, write_meta
from smoltrain.demo import EVAL_RESERVE_S, FIXED_RESERVE_S, pretraining_seconds, unigram_losses


def _shard(folder: Path, documents: list[list[int]], vocab: int) -> None:
    folder.mkdir(parents=True)
    with ShardWriter(folder, shard_name("s", 0), token_dtype(vocab)) as writer:
        for doc in documents:
            writer.add_document(np.array(doc))
        entry = writer.close()
    write_meta(folder, shards=[entry], dtype=token_dtype(vocab), vocab_size=vocab, tokenizer_hash=None)


def test_unigram_loss_matches_a_brute_force_count(tmp_path):
    vocab = 10
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 6, size=n).tolist() for n in (5, 17, 40)]  # ids 6..9 never seen in training
    val = [[0, 1, 1, 2, 9], [3, 3, 5]]
    _shard(tmp_path / "train", train, vocab)
    _shard(tmp_path / "val", val, vocab)
    data = DataConfig(sources={"a": str(tmp_path / "train")}, validation={"a": str(tmp_path / "val")})
    counts = Counter(t for doc in train for t in doc)
    total = sum(counts.values())
    tokens = [t for doc in val for t in doc]
    expected = -sum(math.log((counts[t] + 0.5) / (total + 0.5 * vocab)) for t in tokens) / len(tokens)
    assert unigram_losses(data, vocab) == {"a": pytest.approx(expected, rel=1e-12)}


def test_pretraining_gets_what_is_left_but_never_less_than_its_floor():
    budget = 600.0
    assert pretraining_seconds(budget, elapsed_s=100.0) == budget - 100.0 - EVAL_RESERVE_S - FIXED_RESERVE_S
    # A loaded machine made the ablation take 8.4 of 10 minutes (seen): 40% of the budget, not 3 s.
    assert pretraining_seconds(budget, elapsed_s=504.0) == 0.4 * budget
    assert pretraining_seconds(budget, elapsed_s=900.0) == 0.4 * budget


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


TINY_RECIPE = {
    "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 96, "max_seq_len": 64},
    "data": {"embedded": True, "embedded_vocab_size": 512, "embedded_fraction": 0.03, "seq_len": 64},
    "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine", "min_lr": 1e-3},
    "train": {"global_batch_tokens": 512, "micro_batch_size": 8, "device": "cpu", "tensorboard": False},
    "eval": {"batch_size": 8},
}


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_recipe(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "cache_dir": str(tmp_path / "cache")}}))
    out = tmp_path / "demo"
    from smoltrain.demo import demo

    html_path = demo(str(out), minutes=1, recipe=str(recipe), suite_items=8, ablation_steps=3, pretrain_steps=6)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith(f"report: {html_path}")  # the report path comes last

    markdown = (out / "report.md").read_text()
    for section in ("1. Data", "2. Ablation", "3. Pretraining", "4. Evaluation", "5. Hugging Face export",
                    "6. Vibe test", "7. Wall time per stage"):
        assert f"## {section}" in markdown
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == len(re.findall(r"!\[", markdown)) >= 6

    result = json.loads((out / "eval.json").read_text())
    assert set(result["tasks"]) == {"arithmetic_choice", "arithmetic_answer", "code_tokens", "prose_cloze"}
    assert set(result["val"]) == {"prose", "code", "math"}
    assert "LlamaForCausalLM" in markdown and "greedy continuations are identical" in markdown
    diff = float(re.search(r"logits differ from ours by at most ([0-9.e+-]+)", markdown).group(1))
    assert diff <= 1e-4
    ablation = json.loads((out / "ablation" / "results.json").read_text())
    assert set(ablation["arms"]) == {"baseline", "no-document-masking"}
    assert all(len(arm["runs"]) == 2 for arm in ablation["arms"].values())
    assert ablation["budget"]["steps"] == 3
    wall = re.findall(r"^\| (data|baselines|ablation|pretrain|evaluate|export|vibe test|report) \| ", markdown, re.M)
    assert len(wall) == 8

    demo(str(out), minutes=1, recipe=str(recipe), suite_items=4, ablation_steps=2, pretrain_steps=2)  # a re-run replaces its own folder
    assert (out / "report.html").is_file()


def test_deadline_stops_the_trainer_which_saves_and_returns(tmp_path):
    """The demo's time box: the real trainer, told to run 100,000 steps, stops at the deadline (its
    should_stop hook, no signal) with a complete checkpoint."""
    from rich.console import Console

    from smoltrain.config import config_from_dict
    from smoltrain.data.synthetic import write_synthetic_shards
    from smoltrain.demo import Deadline
    from smoltrain.train.checkpoint import load_model_from_checkpoint
    from smoltrain.train.trainer import run

    write_synthetic_shards(tmp_path / "data", 50_000, vocab_size=64, mean_document_tokens=50)
    config = config_from_dict({
        "model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                  "intermediate_size": 32, "max_seq_len": 16},
        "data": {"sources": {"toy": str(tmp_path / "data")}, "seq_len": 16},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 100_000, "global_batch_tokens": 64, "micro_batch_size": 4,
                  "log_every": 50, "save_every": 100_000, "eval_every": 100_000, "device": "cpu", "tensorboard": False},
    })
    deadline = Deadline(2.0, Console(quiet=True), minimum=0.0)
    summary = run(config, should_stop=deadline)
    assert deadline.fired and not summary["finished"] and summary["stopped_by"] == "should_stop"
    assert 0 < summary["step"] < 100_000
    model, saved = load_model_from_checkpoint(tmp_path / "run", "cpu")
    assert saved.train.max_steps == 100_000
