"""Exact resume: `smoltrain train` killed with SIGKILL (mid-interval, in the middle of a save, right
after a checkpoint's rename) and re-run reproduces the uninterrupted run's per-step losses bit for
bit on CPU, and ends with identical weights."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from smoltrain.data.synthetic import write_synthetic_shards
from smoltrain.train.checkpoint import load_model_from_checkpoint

RECIPE = """
model: {{vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64,
        max_seq_len: 32, nope_every: 2}}
data:
  sources: {{web: {data}/web, code: {data}/code}}
  mixture: {{web: 0.7, code: 0.3}}
  seq_len: 16
  stages: [{{name: late, start_step: 18, mixture: {{web: 0.2, code: 0.8}}, seq_len: 32}}]
optim: {{lr: 0.01, warmup_steps: 3, decay_fraction: 0.3}}
train: {{max_steps: 30, log_every: 1, save_every: 5, eval_every: 1000, keep_checkpoints: 2,
        global_batch_tokens: 128, micro_batch_size: 4, tensorboard: false}}
"""


def train(recipe, out_dir, crash=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SMOLTRAIN_TEST_CRASH", None)
    if crash:
        env["SMOLTRAIN_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, "-m", "smoltrain", "train", str(recipe), "--set", f"train.out_dir={out_dir}"],
        env=env, capture_output=True, text=True, timeout=300,
    )


def per_step(out_dir):
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in lines if "loss" in m and "event" not in m]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_synthetic_shards(data / "web", 30_000, vocab_size=256, mean_document_tokens=40, seed=1, name="web")
    write_synthetic_shards(data / "code", 30_000, vocab_size=256, mean_document_tokens=90, seed=2, name="code")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data))

    reference = train(recipe, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    expected = per_step(tmp_path / "reference")
    assert [s for s, *_ in expected] == list(range(1, 31))

    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    # 1. Killed between checkpoints: steps 11-13 are lost and redone from step 10.
    killed = train(recipe, run, crash="after_step_13")
    assert killed.returncode == -signal.SIGKILL
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    # 2. Killed in the middle of saving step 20 (data written, not sealed): step_20 must not exist.
    killed = train(recipe, run, crash="save_20_after_data")
    assert killed.returncode == -signal.SIGKILL
    assert "resumed from" in killed.stdout and "step 10" in killed.stdout
    assert (checkpoints / ".step_00000020.tmp").is_dir() and not (checkpoints / "step_00000020").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_00000015"
    # 3. Killed after step 25's rename but before `latest` moved: resume from what `latest` says.
    killed = train(recipe, run, crash="save_25_after_rename")
    assert killed.returncode == -signal.SIGKILL
    assert (checkpoints / "step_00000025").is_dir()
    assert (checkpoints / "latest").read_text().strip() == "step_00000020"
    # 4. Re-run the same command to the end.
    finished = train(recipe, run)
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stdout and "step 20" in finished.stdout

    assert per_step(run) == expected  # bitwise: floats round-trip exactly through JSON
    ours, _ = load_model_from_checkpoint(run)
    theirs, _ = load_model_from_checkpoint(tmp_path / "reference")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000025", "step_00000030"]
