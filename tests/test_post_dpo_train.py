"""`smoltrain dpo` in the one Trainer loop: a precomputed reference trains exactly like a live one,
a SIGKILLed run resumes from its checkpoint reusing the stored reference pass with the same per-step
losses, and two FSDP2 ranks (gloo) train like one process."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from preference_helpers import SHAPE, preference_rows, save_init_model, write_rows
from spawn_helpers import leaves_without_teardown

from smoltrain.config import DataConfig, TrainConfig
from smoltrain.post.preference import stage as dpo
from smoltrain.post.preference.stage import REFERENCE_FILE, load_dpo_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_train")
    save_init_model(root, "init")
    for name, (n, seed) in {"train": (64, 1), "eval": (16, 2)}.items():
        write_rows(root / f"{name}.jsonl", preference_rows(n, seed))
    (root / "recipe.yaml").write_text(RECIPE.format(root=root))
    return root


RECIPE = """
# no model section: it comes from train.init; data.seq_len and global_batch_tokens are derived
optim: {{lr: 0.003, warmup_steps: 2, schedule: constant}}
train: {{max_steps: 12, log_every: 1, save_every: 4, eval_every: 6, keep_checkpoints: 3, micro_batch_size: 4,
        init: {root}/init, tensorboard: false, device: cpu}}
eval: {{val_batches: 0}}
dpo: {{train_data: [{root}/train.jsonl], eval_data: [{root}/eval.jsonl], loss: apo_zero, beta: 0.5, pairs_per_step: 8,
      max_length: 64}}
"""


def config_for(root, out, overrides=()):
    return load_dpo_config(root / "recipe.yaml", [f"train.out_dir={out}", *overrides])


def test_recipe_takes_the_model_from_init_and_sets_no_token_batch_keys(root):
    config = config_for(root, root / "x", ["optim.lr=0.01"])
    assert {k: getattr(config.model, k) for k in SHAPE} == SHAPE
    assert config.data.tokenizer == str((root / "init").resolve())  # the run folder will know its tokenizer
    # a step is dpo.pairs_per_step pairs: data.seq_len and global_batch_tokens stay as the recipe left them
    assert (config.data.seq_len, config.train.global_batch_tokens) == (DataConfig.seq_len, TrainConfig.global_batch_tokens)
    assert config.optim.lr == 0.01 and config.optim.weight_decay == 0.0  # DPO's default where the recipe is silent
    assert load_dpo_config(None, ["dpo.beta=0.2"]).optim.lr == 1e-6


def steps(out):
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m and "event" not in m and "eval" not in m]


def evals(out):
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval" in m]


@pytest.fixture(scope="module")
def precomputed(root):
    out = root / "precomputed"
    dpo.run(config_for(root, out))
    return out


def test_dpo_run_learns_and_logs_trl_metrics(precomputed):
    lines = steps(precomputed)
    assert [m["step"] for m in lines] == list(range(1, 13))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(name in m for m in lines), name
    # step 1 starts at the reference: every log-ratio is 0, so APO-zero's loss is exactly 1
    assert lines[0]["loss"] == pytest.approx(1.0, abs=1e-6) and lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"]
    held_out = [m["eval"]["preference"] for m in evals(precomputed)]
    assert held_out[-1]["pairs"] == 16 and held_out[-1]["accuracy"] > 0.75
    assert (precomputed / REFERENCE_FILE).is_file()
    from smoltrain.train.load_model import load_any

    assert load_any(precomputed)[2] is not None  # export, eval and merge find the tokenizer


def test_precomputed_reference_trains_like_a_live_reference(root, precomputed):
    out = root / "live"
    dpo.run(config_for(root, out, ["dpo.precompute=false"]))
    assert not (out / REFERENCE_FILE).exists()
    for a, b in zip(steps(precomputed), steps(out), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    for a, b in zip(evals(precomputed), evals(out), strict=True):
        assert a["eval"]["preference"]["accuracy"] == b["eval"]["preference"]["accuracy"]


def _cli(root, out, crash=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SMOLTRAIN_TEST_CRASH", None)
    if crash:
        env["SMOLTRAIN_TEST_CRASH"] = crash
    return subprocess.run([sys.executable, "-m", "smoltrain", "dpo", str(root / "recipe.yaml"), "--set", f"train.out_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_after_sigkill_reuses_the_reference_pass_and_matches(root, precomputed):
    out = root / "killed"
    killed = _cli(root, out, crash="after_step_6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stored = (out / REFERENCE_FILE).stat()
    finished = _cli(root, out)
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stdout and "reference log-probs: reusing" in finished.stderr
    assert (out / REFERENCE_FILE).stat().st_mtime_ns == stored.st_mtime_ns
    expected = {m["step"]: m for m in steps(precomputed)}
    got = {m["step"]: m for m in steps(out)}
    assert sorted(got) == list(range(1, 13))
    for step, m in got.items():  # bit for bit on CPU, as pretraining's resume
        assert (m["loss"], m["grad_norm"], m["rewards/margins"]) == (
            expected[step]["loss"], expected[step]["grad_norm"], expected[step]["rewards/margins"]), step


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _worker(rank, world, root, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dpo.run(config_for(Path(root), Path(root) / "fsdp", ["train.max_steps=6"]))
    assert not dist.is_initialized()


@pytest.mark.slow
def test_dpo_under_fsdp_two_ranks_equals_one_process(root, precomputed):
    mp.spawn(_worker, args=(2, str(root), _free_port()), nprocs=2, join=True)
    one, two = steps(precomputed)[:6], steps(root / "fsdp")
    assert len(two) == 6
    for a, b in zip(one, two):
        # At step 1 the policy is the reference: every reward is 0 up to rounding, and the accuracy counts the
        # signs of that rounding (0.125 vs 0.0 on an AVX-512 Xeon), so it is compared from step 2 on.
        keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen") + (("rewards/accuracies",) if a["step"] > 1 else ())
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    # both ranks computed half of the reference pass; the stored file equals the one-process pass
    from safetensors.torch import load_file

    single, sharded = load_file(precomputed / REFERENCE_FILE), load_file(root / "fsdp" / REFERENCE_FILE)
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-5)


def test_report_shows_held_out_accuracy_first_and_last(precomputed):
    from smoltrain.post.preference.stage import write_report

    text = write_report(precomputed).read_text()
    first, last = [m["eval"]["preference"] for m in evals(precomputed)][::len(evals(precomputed)) - 1]
    assert f"| 16 | 6 | {first['accuracy']:.3f}" in text and f"| 16 | 12 | {last['accuracy']:.3f}" in text


def test_the_demo_recipe_reads_with_any_init_model(root):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "dpo" / "demo.yaml"
    config = load_dpo_config(recipe, [f"train.init={root / 'init'}"])
    assert config.dpo.loss == "apo_zero" and config.dpo.beta == 0.1 and config.model.hidden_size == SHAPE["hidden_size"]
    assert config.train.global_batch_tokens == TrainConfig.global_batch_tokens  # not DPO's key: left alone


def test_the_start_line_counts_a_step_in_pairs(root, capsys):
    config = config_for(root, root / "one_step", ["train.max_steps=1", "dpo.pairs_per_step=16"])
    dpo.run(config)
    # the recipe: micro_batch_size 4 pairs, so 16 pairs a step are 4 micro-batches on one process
    assert "a step = 16 pairs = 4 x 4 accumulation x 1 data-parallel |" in capsys.readouterr().out


@leaves_without_teardown
def _reference_worker(rank, world, root, port, out):
    """Each rank: the reference's local parameter count, and the pass over 5 pairs (uneven shares) next
    to the same pass by a full copy of the model."""
    from torch.distributed.tensor import DTensor

    from smoltrain.post.preference.data import TextTokenizer, load_preferences
    from smoltrain.train.distributed import setup_distributed
    from smoltrain.train.load_model import load_any

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    config = config_for(Path(root), Path(root) / "unused")
    ctx = setup_distributed(config.parallel, config.model, device="cpu", compile="off")
    reference = dpo.build_reference_model(config.train.init, config, ctx)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in reference.parameters())
    pairs = load_preferences(Path(root) / "eval.jsonl", TextTokenizer.load(Path(root) / "init")).pairs[:5]
    sharded = dpo._shared_logprobs(reference, pairs, 2, 64, 0, ctx, "fp32")
    full = dpo.sequence_logprobs(load_any(config.train.init)[0], pairs, 2, 64, 0, torch.device("cpu"), "fp32")
    torch.save({"local": local, "sharded": sharded, "full": full}, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_reference_is_sharded_like_the_policy_under_fsdp(root, tmp_path):
    from smoltrain.train.load_model import load_any

    mp.spawn(_reference_worker, args=(2, str(root), _free_port(), str(tmp_path)), nprocs=2, join=True)
    total = sum(p.numel() for p in load_any(root / "init")[0].parameters())
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sum(g["local"] for g in got) == total and all(g["local"] <= 0.55 * total for g in got)  # halves, no copy
    for g in got:
        for sharded, full in zip(g["sharded"], g["full"]):
            torch.testing.assert_close(sharded, full, rtol=1e-5, atol=1e-5)
