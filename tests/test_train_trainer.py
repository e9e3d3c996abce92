"""The training loop in-process on a tiny model: the non-finite guard, spike skip and rewind (the
skipped batches are really skipped), stage switching, SIGTERM save-and-stop, --init, config errors."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from pretrain_helpers import tiny_pretrain_config

import smoltrain.train.trainer as trainer
from smoltrain.cli import main as cli_main
from smoltrain.config import StageConfig, config_from_dict, load_config
from smoltrain.data.loader import build_train_loader
from smoltrain.errors import ConfigError
from smoltrain.eval.during_training import DuringTraining
from smoltrain.train.checkpoint import load_model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(sources, out_dir, **train):
    """Ten steps with a checkpoint every four: room to rewind and to resume."""
    return tiny_pretrain_config(sources, out_dir, **{"max_steps": 10, "save_every": 4, **train})


class Recorder:
    """Wraps forward_backward: counts calls, snapshots the weights each call starts from, and can
    tamper with the result of chosen calls."""

    def __init__(self, monkeypatch, tamper=None):
        self.calls, self.weights, self.batches = 0, [], []
        self.tamper = tamper or {}
        real = trainer.forward_backward

        def wrapped(model, objective, micro_batches, *args):
            self.calls += 1
            self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            self.batches.extend(b["input_ids"].clone() for b in micro_batches)
            result = real(model, objective, micro_batches, *args)
            if self.calls in self.tamper:
                loss, norm = self.tamper[self.calls](model, result.loss, result.grad_norm)
                result = result._replace(loss=loss, grad_norm=norm)
            return result

        monkeypatch.setattr(trainer, "forward_backward", wrapped)


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def reference_batches(config, count):
    loader = build_train_loader(config)
    return [loader.next_batch()["input_ids"] for _ in range(count)]


def test_non_finite_loss_or_gradient_never_updates_the_weights(two_sources, tmp_path, monkeypatch):
    def poison(model, loss, norm):
        for p in model.parameters():
            p.grad.fill_(float("nan"))
        return float("nan"), float("nan")

    recorder = Recorder(monkeypatch, tamper={3: poison})
    summary = trainer.run(make_config(two_sources, tmp_path / "run", max_steps=5))
    assert summary["skipped_steps"] == 1 and summary["step"] == 5
    w = recorder.weights  # w[i] = weights at the start of step i + 1
    assert not same_weights(w[1], w[2])  # step 2 updated
    assert same_weights(w[2], w[3])  # step 3 (non-finite) did not
    assert not same_weights(w[3], w[4])  # step 4 updated again, from clean optimizer state
    model, _ = load_model_from_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [m for m in metrics(tmp_path / "run") if m.get("event") == "nonfinite"]
    assert events == [{"step": 3, "event": "nonfinite", "loss": None, "grad_norm": None}]


def test_spike_with_skip_action_withholds_the_update(two_sources, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, tamper={7: lambda model, loss, norm: (loss * 50, norm)})
    summary = trainer.run(make_config(two_sources, tmp_path / "run", spike_action="skip", spike_window=5, spike_std=10))
    assert summary["spikes"] == 1 and summary["skipped_steps"] == 1
    assert same_weights(recorder.weights[6], recorder.weights[7])
    assert not same_weights(recorder.weights[5], recorder.weights[6])


def test_spike_rewind_restores_the_checkpoint_and_really_skips_the_next_batches(two_sources, tmp_path, monkeypatch):
    config = make_config(two_sources, tmp_path / "run", spike_action="rewind", spike_window=5, spike_std=10,
                         spike_skip_batches=5)
    recorder = Recorder(monkeypatch, tamper={7: lambda model, loss, norm: (loss * 50, norm)})
    summary = trainer.run(config)
    assert summary["step"] == 10 and summary["rewinds"] == 1 and summary["spikes"] == 1

    # 2 micro-batches per step. Steps 1-7 read micro-batches 0-13; the rewind goes back to the step-4
    # checkpoint (8 read), skips 5 steps' worth (10), so steps 5-10 read micro-batches 18-29.
    expected = list(range(14)) + list(range(18, 30))
    stream = reference_batches(config, 30)
    assert len(recorder.batches) == len(expected)
    for got, index in zip(recorder.batches, expected):
        assert torch.equal(got, stream[index])
    # Training continued from the checkpoint's weights: the step after the rewind starts where step 5 did.
    assert same_weights(recorder.weights[7], recorder.weights[4])
    lines = metrics(tmp_path / "run")
    steps = [m["step"] for m in lines if "loss" in m and "event" not in m]
    assert steps == list(range(1, 11))  # one training line per step: the undone ones were dropped
    assert [m["event"] for m in lines if "event" in m] == ["spike", "rewind"]


def test_a_spike_that_persists_after_three_rewinds_is_skipped_instead(two_sources, tmp_path, monkeypatch):
    config = make_config(two_sources, tmp_path / "run", spike_action="rewind", spike_window=5, spike_std=10,
                         save_every=6)
    Recorder(monkeypatch, tamper={call: lambda model, loss, norm: (loss * 50, norm) for call in range(7, 40)})
    summary = trainer.run(config)
    assert summary["finished"] and summary["rewinds"] == 3
    assert summary["skipped_steps"] == 4  # steps 7-10, after the third rewind to step 6
    lines = metrics(tmp_path / "run")
    assert [m["event"] for m in lines if m.get("event") == "rewind"] == ["rewind"] * 3


def test_stages_switch_mixture_sequence_length_rope_and_schedule(two_sources, tmp_path, monkeypatch):
    config = make_config(two_sources, tmp_path / "run", max_steps=6, save_every=100)
    config.data.mixture = {"low": 1.0, "high": 0.0}
    config.data.stages = [StageConfig(name="long", start_step=3, mixture={"low": 0.0, "high": 1.0}, seq_len=32,
                                      rope_theta=50000.0, reset_schedule=True, lr=5e-3)]
    recorder = Recorder(monkeypatch)
    trainer.run(config)
    # Steps 1-3 (accumulation 2 at seq 16) read the low source, steps 4-6 (accumulation 1 at seq 32) the high one.
    before, after = recorder.batches[:6], recorder.batches[6:]
    assert len(after) == 3
    assert all(b.shape == (2, 16) and int(b[b > 0].max()) < 100 for b in before)
    assert all(b.shape == (2, 32) and int(b[b > 0].min()) >= 100 for b in after)
    lines = metrics(tmp_path / "run")
    assert {"step": 3, "event": "stage", "stage": 0, "seq_len": 32, "rope_theta": 50000.0, "rope_scaling": None} in lines
    lr = {m["step"]: m["lr"] for m in lines if "lr" in m}
    assert lr[4] == pytest.approx(5e-3 / 2)  # a fresh warmup (2 steps) at the stage's peak
    assert lr[5] == pytest.approx(5e-3)
    model, saved = load_model_from_checkpoint(tmp_path / "run")
    assert model.rope_theta == 50000.0 and saved.model.rope_theta == 50000.0


def test_sigterm_saves_and_stops_then_rerun_continues_identically(two_sources, tmp_path, monkeypatch):
    straight = trainer.run(make_config(two_sources, tmp_path / "straight", max_steps=6))

    def terminate(model, loss, norm):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss, norm

    Recorder(monkeypatch, tamper={3: terminate})
    config = make_config(two_sources, tmp_path / "run", max_steps=6)
    stopped = trainer.run(config)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["step"] == 3 and not stopped["finished"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    monkeypatch.undo()
    resumed = trainer.run(config)
    assert resumed["finished"] and resumed["loss"] == straight["loss"]
    losses = lambda d: [m["loss"] for m in metrics(d) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_init_starts_from_a_model_folder(two_sources, tmp_path, monkeypatch):
    from smoltrain.model.transformer import build_model
    from smoltrain.train.load_model import save_model_folder

    config = make_config(two_sources, tmp_path / "run", max_steps=1)
    source = build_model(config.model, seed=42)
    save_model_folder(source, config, tmp_path / "init")
    recorder = Recorder(monkeypatch)
    config.train.init = str(tmp_path / "init")
    trainer.run(config)
    assert same_weights(recorder.weights[0], source.state_dict())

    config.model.intermediate_size = 96
    config.train.out_dir = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="model.intermediate_size is 96 here but 64 in the init model"):
        trainer.run(config)


def test_config_mistakes_are_one_line_and_exit_code_2(two_sources, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make_config(two_sources, tmp_path / "run").to_yaml())
    cases = [
        (["--set", "train.max_step=3"], "did you mean 'max_steps'"),
        (["--set", "train.global_batch_tokens=80"], "train.global_batch_tokens (80) must be a multiple"),
        (["--set", "data.stages=[{name: long, start_step: 2, seq_len: 48}]"],
         "must be a multiple of train.micro_batch_size x seq_len x data-parallel ranks (2 x 48 x 1 = 96)"),
        (["--resume", str(tmp_path / "nowhere")], "no such checkpoint or run folder"),
    ]
    for extra, message in cases:
        assert cli_main(["train", str(recipe), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    # And as a real process: no traceback.
    done = subprocess.run([sys.executable, "-m", "smoltrain", "train", str(recipe), "--set", "optim.lr=-1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"smoltrain train: error: {recipe}: optim.lr must be positive, got -1.0"]


def test_the_resolved_config_and_summary_are_written(two_sources, tmp_path):
    config = make_config(two_sources, tmp_path / "run", max_steps=2)
    summary = trainer.run(config)
    assert load_config(tmp_path / "run" / "config.yaml") == config
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    line = [m for m in metrics(tmp_path / "run") if "eval" not in m][-1]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"):
        assert key in line
    assert line["tokens"] == 2 * 64 and line["mfu"] is None  # no known peak on CPU
    # Re-running a finished run does nothing and says so in the summary.
    again = trainer.run(config)
    assert again["finished"] and again["step"] == 2 and again["loss"] == summary["loss"]


def test_periodic_evaluation_writes_validation_loss_and_bpb_per_source(tmp_path):
    config = config_from_dict({
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32},
        "data": {"embedded": True, "embedded_fraction": 0.03, "embedded_vocab_size": 512,
                 "cache_dir": str(tmp_path / "cache"), "seq_len": 32},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 4, "log_every": 1, "save_every": 100,
                  "eval_every": 2, "global_batch_tokens": 128, "micro_batch_size": 4, "tensorboard": False},
        "eval": {"val_batches": 1, "batch_size": 4},
    })
    trainer.run(config, evaluation=DuringTraining())
    evals = [m for m in metrics(tmp_path / "run") if "eval" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert set(m["eval"]["val"]) == {"prose", "code", "math"}
        for source in m["eval"]["val"].values():
            assert source["tokens"] > 0 and 0 < source["loss"] < 10 and 0 < source["bpb"] < 10


def test_activation_checkpointing_changes_memory_not_results(two_sources, tmp_path):
    plain = trainer.run(make_config(two_sources, tmp_path / "plain", max_steps=3))
    checkpointed = trainer.run(make_config(two_sources, tmp_path / "ac", max_steps=3, activation_checkpointing=True))
    trainer.run(make_config(two_sources, tmp_path / "ac2", max_steps=3, activation_checkpointing=True,
                            activation_checkpointing_every=2))
    losses = lambda d: [m["loss"] for m in metrics(d) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "ac") == losses(tmp_path / "plain") and checkpointed["loss"] == plain["loss"]
    assert losses(tmp_path / "ac2") == losses(tmp_path / "plain")
    # Checkpoints keep canonical names: the wrapped model's weights load into a plain model.
    a, _ = load_model_from_checkpoint(tmp_path / "ac")
    b, _ = load_model_from_checkpoint(tmp_path / "plain")
    assert same_weights(a.state_dict(), b.state_dict())


def test_rerun_with_a_truncated_latest_checkpoint_resumes_from_the_previous_one(two_sources, tmp_path, capsys):
    config = make_config(two_sources, tmp_path / "run", max_steps=8)
    first = trainer.run(config)
    data = tmp_path / "run" / "checkpoints" / "step_00000008" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    capsys.readouterr()
    again = trainer.run(config)
    out = capsys.readouterr().out
    assert "step_00000004 (step 4" in out and again["step"] == 8
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 9))  # steps 5-8 redone once
    assert again["loss"] == first["loss"]
    assert trainer.find_checkpoint(tmp_path / "run").name == "step_00000008"  # rewritten, sound
