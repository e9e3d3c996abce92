"""A resume knows what changed (issue 11, item 8): it prints the config keys that differ from the
checkpoint's, keeps each segment's config in config.history/, refuses a data source whose shards
changed under the same name (one line, exit 2) unless --allow-data-change (which restarts that
source's position and logs an event), and warns when a longer schedule raises a decayed lr again."""

import json

import pytest
import torch
from synthetic_shards import write_random_documents

from smoltrain.cli import main as cli_main
from smoltrain.config import config_from_dict, load_config
from smoltrain.data.loader import build_train_loader
from smoltrain.errors import DataError
from smoltrain.train import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(data, out_dir, **train):
    return config_from_dict({
        "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 16},
        "data": {"sources": {"web": str(data)}, "seq_len": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "decay_fraction": 0.5},
        "train": {"out_dir": str(out_dir), "max_steps": 4, "log_every": 1, "save_every": 2, "eval_every": 1000,
                  "global_batch_tokens": 32, "micro_batch_size": 2, "tensorboard": False, "device": "cpu", **train},
    })


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_prints_what_changed_and_keeps_each_segments_config(tmp_path, capsys):
    write_random_documents(tmp_path / "web", "web", 1, 200, seed=1)
    trainer.run(make_config(tmp_path / "web", tmp_path / "run"))
    changed = make_config(tmp_path / "web", tmp_path / "run", max_steps=6, seed=7)
    changed.optim.lr = 2e-2
    capsys.readouterr()
    trainer.run(changed)
    out = capsys.readouterr().out
    assert "resuming with a changed config (since step 4)" in out
    assert "optim.lr 0.01 -> 0.02" in out and "train.seed 0 -> 7" in out and "train.max_steps 4 -> 6" in out
    history = sorted((tmp_path / "run" / "config.history").iterdir())
    assert [p.name for p in history] == ["step_00000000.yaml", "step_00000004.yaml"]
    assert load_config(history[0]).optim.lr == 1e-2 and load_config(history[1]).optim.lr == 2e-2
    assert load_config(tmp_path / "run" / "config.yaml").optim.lr == 2e-2


def test_a_source_that_changed_under_its_name_is_refused_unless_allowed(tmp_path, capsys):
    write_random_documents(tmp_path / "web", "web", 1, 200, seed=1)
    write_random_documents(tmp_path / "other", "web", 1, 200, 3000, seed=2)  # other shards, same source name
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make_config(tmp_path / "web", tmp_path / "run").to_yaml())
    assert cli_main(["train", str(recipe)]) == 0
    capsys.readouterr()
    moved = ["--set", f"data.sources.web={tmp_path / 'other'}", "--set", "train.max_steps=6"]
    assert cli_main(["train", str(recipe), *moved]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.sources.web: the data changed since the checkpoint" in err
    assert "--allow-data-change" in err

    # Allowed: the position in the changed source starts over, as a fresh run on the new data would.
    seen = []
    real = trainer.forward_backward

    def record(model, objective, micro_batches, *args):
        seen.extend(b["input_ids"] for b in micro_batches)
        return real(model, objective, micro_batches, *args)

    trainer.forward_backward = record
    try:
        assert cli_main(["train", str(recipe), *moved, "--allow-data-change"]) == 0
    finally:
        trainer.forward_backward = real
    fresh = build_train_loader(make_config(tmp_path / "other", tmp_path / "x"))
    assert all(torch.equal(got, fresh.next_batch()["input_ids"]) for got in seen)
    assert [m["sources"] for m in metrics(tmp_path / "run") if m.get("event") == "data_change"] == [["web"]]
    with pytest.raises(DataError):  # the other way round as well: the checkpoint now refers to the new data
        trainer.run(make_config(tmp_path / "web", tmp_path / "run", max_steps=8))


def test_extending_a_finished_decay_warns_that_the_lr_goes_back_up(tmp_path, capsys):
    write_random_documents(tmp_path / "web", "web", 1, 200, seed=1)
    config = make_config(tmp_path / "web", tmp_path / "run")
    trainer.run(config)  # WSD over 4 steps: decay in steps 3-4
    capsys.readouterr()
    trainer.run(config)  # the same schedule again (finished): nothing to say
    assert "goes back up" not in capsys.readouterr().out
    trainer.run(make_config(tmp_path / "web", tmp_path / "run", max_steps=12))  # decay now starts at step 6
    out = capsys.readouterr().out
    assert "at step 4 the lr goes back up from 0.005 to 0.01" in out and "train.max_steps 4 -> 12" in out
    assert [m["step"] for m in metrics(tmp_path / "run") if m.get("event") == "schedule"] == [4]
