"""Debugging a run: the playbook's incidents made to happen on CPU and named by `smoltrain doctor --run`
from the run's own metrics (a loader slowed mid-run, sequences in document order, a slowed gloo rank, a
growing allocation), a clean run of the demo recipe with no findings, and the rules' arithmetic
against brute-force references (a per-window polynomial fit, a direct autocorrelation sum).

The incidents are induced from outside the library: each test hands the Trainer an objective factory
that wraps the real pretraining objective (its batches slowed, in document order, or its loss
keeping tensors alive), so no test hook lives in smoltrain itself.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import tiny_pretrain_config
from spawn_helpers import leaves_without_teardown

from smoltrain.cli import main as cli_main
from smoltrain.config import config_from_dict, load_config
from smoltrain.data.shards import ShardWriter, shard_name, write_meta
from smoltrain.report.diagnosis import diagnose, lag1_autocorrelation, smooth_trend
from smoltrain.report.run import read_records, report_run
from smoltrain.train.pretrain import build_pretrain_objective
from smoltrain.train.rank_watch import RankWatch
from smoltrain.train.step_timer import CLIMB_WINDOW, memory_climb
from smoltrain.train.trainer import Trainer


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def doctor(run: Path, tmp_path: Path, *extra: str) -> tuple[int, list[dict]]:
    """`smoltrain doctor --run RUN --json OUT --strict`: (exit code, findings)."""
    out = tmp_path / f"{run.name}_doctor.json"
    code = cli_main(["doctor", "--run", str(run), "--json", str(out), "--strict", *extra])
    return code, json.loads(out.read_text())["findings"]


def kinds(findings: list[dict]) -> set[str]:
    return {f["kind"] for f in findings}


# ----------------------------------------------------------------------------- induced incidents


def with_batches(wrap):
    """An objective factory: the pretraining objective with `wrap(batches)` as its batch source."""
    def build(config, model, ctx, run_dir):
        objective = build_pretrain_objective(config, model, ctx, run_dir)
        wrap(objective.batches, ctx)
        return objective
    build.preflight = build_pretrain_objective.preflight
    return build


def slow_after(calls: int, seconds: float):
    """Every micro-batch after the first `calls` takes `seconds` longer: storage that went cold mid-run."""
    def wrap(batches, ctx):
        real, count = batches.next_batch, [0]

        def next_batch():
            count[0] += 1
            if count[0] > calls:
                time.sleep(seconds)
            return real()
        batches.next_batch = next_batch
    return wrap


def test_a_loader_slowed_mid_run_is_named_throughput_decline_and_data_wait(two_sources, tmp_path, one_thread):
    # 2 micro-batches a step: from step 13 on each waits 60 ms, several times the tiny model's step.
    config = tiny_pretrain_config(two_sources, tmp_path / "slowed", max_steps=24)
    Trainer(config, with_batches(slow_after(calls=24, seconds=0.06))).train()
    lines = [r for r in records(tmp_path / "slowed") if "loss" in r]
    assert all(r["time/data_s"] >= 0.12 for r in lines[12:])  # the sleeps alone, whatever the machine
    for r in lines:  # the parts add up to the step (the rest is what the named parts leave)
        parts = r["time/data_s"] + r["time/forward_backward_s"] + r["time/optimizer_s"] + r["time/other_s"]
        assert parts == pytest.approx(r["time/step_s"], rel=1e-9) or r["time/other_s"] == 0.0

    code, findings = doctor(tmp_path / "slowed", tmp_path, "--matmul-tflops", "1e-6")
    assert code == 1 and {"throughput_decline", "data_wait"} <= kinds(findings)
    decline = next(f for f in findings if f["kind"] == "throughput_decline")
    assert decline["steps"] in ([13, 24], [12, 24])  # where the sleeps began (or a step a neighbour's job slowed)
    assert decline["evidence"]["data_wait_share_after"] > 0.5 > decline["evidence"]["data_wait_share_before"]
    assert "S3" in decline["cause"]
    # The run report names the same findings (but low_mfu, which needs the measured matmul rate).
    diagnosis = report_run(tmp_path / "slowed")[0].read_text().split("### Diagnosis")[1]
    assert f"| throughput_decline | {decline['steps'][0]}-24 |" in diagnosis and "| data_wait |" in diagnosis and "low_mfu" not in diagnosis


def write_easy_and_hard_documents(folder: Path, num_documents: int = 40, length: int = 320) -> None:
    """Documents of one source that alternate easy (tokens 1-3) and hard (tokens 10-249), each 20 windows
    of 16 tokens long: read in order, neighbouring steps see the same document."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    with ShardWriter(folder, shard_name("docs", 0), np.uint16) as writer:
        for i in range(num_documents):
            low, high = (1, 4) if i % 2 == 0 else (10, 250)
            doc = rng.integers(low, high, size=length)
            doc[-1] = 0
            writer.add_document(doc)
        shard = writer.close()
    write_meta(folder, shards=[shard], dtype=np.uint16, vocab_size=256, tokenizer_hash=None)


def in_document_order(batches, ctx):
    """The loader's global stream with its keyed permutation left out: window k of an epoch is the
    k-th window of the source, as an unshuffled loader reads it."""
    def locate(g: int):
        name, k = batches.mixture.pick(g - batches._stage_start)
        epoch, slot = divmod(k + batches._base[name], batches.datasets[name].num_sequences)
        return name, epoch, slot
    batches.locate = locate


def noise_config(data: Path, out: Path):
    return config_from_dict({
        "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 16},
        "data": {"sources": {"docs": str(data)}, "seq_len": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "constant"},
        "train": {"out_dir": str(out), "max_steps": 120, "log_every": 1, "save_every": 1000, "eval_every": 1000,
                  "global_batch_tokens": 64, "micro_batch_size": 4, "tensorboard": False, "device": "cpu"},
    })


def test_sequences_in_document_order_are_loss_noise_and_the_same_data_shuffled_is_not(tmp_path, one_thread):
    write_easy_and_hard_documents(tmp_path / "docs")
    Trainer(noise_config(tmp_path / "docs", tmp_path / "unshuffled"), with_batches(in_document_order)).train()
    Trainer(noise_config(tmp_path / "docs", tmp_path / "shuffled")).train()

    _, unshuffled = doctor(tmp_path / "unshuffled", tmp_path, "--matmul-tflops", "1e-6")
    _, shuffled = doctor(tmp_path / "shuffled", tmp_path, "--matmul-tflops", "1e-6")
    noise = next(f for f in unshuffled if f["kind"] == "loss_noise")
    assert noise["evidence"]["lag1_autocorrelation"] > 0.5
    assert "shuffle" in noise["check"]
    assert "loss_noise" not in kinds(shuffled), shuffled


def grow_per_call(megabytes: int):
    """The loss keeps a tensor of `megabytes` alive per micro-batch: a list of per-step tensors never freed."""
    kept = []

    def build(config, model, ctx, run_dir):
        objective = build_pretrain_objective(config, model, ctx, run_dir)
        real = objective.loss

        def loss(model, batch):
            kept.append(torch.ones(megabytes * 2**18))  # float32: 4 bytes each, pages touched
            return real(model, batch)
        objective.loss = loss
        return objective
    build.preflight = build_pretrain_objective.preflight
    return build


def _train_with_a_leak(rank: int, config) -> None:
    torch.set_num_threads(1)
    Trainer(config, grow_per_call(megabytes=8)).train()


def test_a_growing_allocation_is_a_memory_growth_event_and_finding(two_sources, tmp_path, one_thread):
    config = tiny_pretrain_config(two_sources, tmp_path / "leak", max_steps=14)
    # In a fresh process, as a run is: late in a long test session the heap holds freed, still resident
    # memory that the leak's allocations reuse, and resident memory then does not climb.
    mp.spawn(_train_with_a_leak, args=(config,), nprocs=1, join=True)
    events = [r for r in records(tmp_path / "leak") if r.get("event") == "memory_growth"]
    assert len(events) == 1 and events[0]["mb_per_step"] == pytest.approx(16, rel=0.3)  # 2 micro-batches of 8 MB

    _, findings = doctor(tmp_path / "leak", tmp_path, "--matmul-tflops", "1e-6")
    growth = next(f for f in findings if f["kind"] == "memory_growth")
    assert growth["evidence"]["field"] == "memory/rss_gb" and growth["evidence"]["mb_per_step"] == pytest.approx(16, rel=0.3)

    # Against a 1 PFLOP/s matmul rate the tiny model's rate is low MFU: the median of the logged rates over it.
    _, findings = doctor(tmp_path / "leak", tmp_path, "--matmul-tflops", "1000")
    low = next(f for f in findings if f["kind"] == "low_mfu")
    rates = [r["tflops_per_device"] for r in records(tmp_path / "leak") if "tflops_per_device" in r]
    assert low["evidence"]["share"] == pytest.approx(np.median(rates[1:]) / 1000, rel=1e-9)  # first line: warm-up


# ----------------------------------------------------------------------------- a slowed gloo rank


def slow_rank(rank: int, seconds: float):
    def wrap(batches, ctx):
        if ctx.rank != rank:
            return
        real = batches.next_batch

        def next_batch():
            time.sleep(seconds)
            return real()
        batches.next_batch = next_batch
    return wrap


@leaves_without_teardown
def _straggler_worker(rank: int, world: int, data: str, out: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    # 2 ranks x 2 rows x 16 tokens = 64 tokens: one micro-batch a step, 50 ms longer on rank 1.
    config = tiny_pretrain_config(Path(data), Path(out), max_steps=10)
    Trainer(config, with_batches(slow_rank(1, 0.05))).train()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_slowed_gloo_rank_is_named_a_straggler(two_sources, tmp_path):
    run = tmp_path / "two_ranks"
    mp.spawn(_straggler_worker, args=(2, str(two_sources), str(run), _free_port()), nprocs=2, join=True)
    lines = [r for r in records(run) if "loss" in r and "event" not in r]
    assert [r["rank/slowest"] for r in lines[1:]] == [1] * (len(lines) - 1)
    assert all(r["rank/slowest_data_s"] >= 0.05 for r in lines)
    events = [r for r in records(run) if r.get("event") == "straggler"]
    assert [e["rank"] for e in events] == [1] and events[0]["host"] == socket.gethostname()

    _, findings = doctor(run, tmp_path, "--matmul-tflops", "1e-6")
    straggler = next(f for f in findings if f["kind"] == "straggler")
    assert straggler["evidence"]["rank"] == 1 and "rank 1" in straggler["summary"]
    assert straggler["steps"] == [events[0]["step"], 10]  # slowest from the event to the end


# ----------------------------------------------------------------------------- a clean run


@pytest.mark.slow
def test_the_demo_recipe_run_has_no_findings_and_its_report_shows_the_time_breakdown(tmp_path, one_thread):
    """The demo recipe's model, schedule and mixture on 5% of the embedded corpus, 40 steps of 4 x 256
    tokens logged every step (a checkpoint and an evaluation at step 20), the matmul rate measured here
    as the doctor does by default."""
    recipe = Path(__file__).parents[1] / "recipes" / "demo.yaml"
    config = load_config(recipe, [f"train.out_dir={tmp_path / 'demo'}", f"data.cache_dir={tmp_path / 'cache'}",
                                  "data.embedded_fraction=0.05", "train.max_steps=40", "train.log_every=1",
                                  "train.global_batch_tokens=1024", "train.micro_batch_size=4", "train.save_every=20",
                                  "train.eval_every=20", "eval.val_batches=2"])
    Trainer(config).train()
    code, findings = doctor(tmp_path / "demo", tmp_path)
    assert (code, findings) == (0, []), findings

    markdown = report_run(tmp_path / "demo")[0].read_text()
    assert "where a step's time goes" in markdown and "No findings" in markdown
    assert "checkpoints (logged total)" in markdown and "evaluation (logged total)" in markdown


# ----------------------------------------------------------------------------- the rules' arithmetic


def test_smooth_trend_is_a_local_quadratic_fit_at_each_window_centre():
    values = list(np.random.default_rng(0).normal(size=40).cumsum())
    window = 9
    want = [np.polyval(np.polyfit(np.arange(window) - window // 2, values[i:i + window], 2), 0)
            for i in range(len(values) - window + 1)]
    np.testing.assert_allclose(smooth_trend(values, window), want, atol=1e-9)


def test_lag1_autocorrelation_matches_a_direct_sum_and_an_ar1_process():
    x = np.random.default_rng(1).normal(size=500)
    centred = x - x.mean()
    direct = sum(centred[i] * centred[i + 1] for i in range(len(x) - 1)) / sum(c * c for c in centred)
    assert lag1_autocorrelation(x) == pytest.approx(direct, rel=1e-12)
    ar = np.zeros(20_000)  # x_t = 0.7 x_{t-1} + noise has lag-1 autocorrelation 0.7
    noise = np.random.default_rng(2).normal(size=len(ar))
    for t in range(1, len(ar)):
        ar[t] = 0.7 * ar[t - 1] + noise[t]
    assert lag1_autocorrelation(ar) == pytest.approx(0.7, abs=0.02)


def test_memory_climb_needs_a_steady_rise_of_a_window():
    steps = list(range(10, 10 + 10 * CLIMB_WINDOW, 10))
    climbing = [(s, 1.0 + 0.002 * s) for s in steps]  # 2 MB per step
    found = memory_climb(climbing)
    assert found["from_step"] == steps[0] and found["to_step"] == steps[-1]
    assert found["mb_per_step"] == pytest.approx(2.0)
    jitter = [(s, 1.0 + 0.05 * (i % 2)) for i, s in enumerate(steps)]  # up and down by 50 MB
    assert memory_climb(jitter) is None
    assert memory_climb(climbing[:-1]) is None  # a window short
    small = [(s, 1.0 + 0.0001 * s) for s in steps]  # rising, but 7 MB in all
    assert memory_climb(small) is None


def test_a_straggler_is_a_rank_over_the_others_median_for_three_logs_in_a_row():
    watch = RankWatch(torch.device("cpu"), world_size=1)
    watch.world, watch.hosts, watch.slow_logs = 4, ["a", "b", "c", "d"], [0] * 4  # as four ranks would see it
    fast, slow = [0.10, 0.11, 0.10, 0.10], [0.10, 0.11, 0.10, 0.14]  # rank 3: 0.14 / median(0.10, 0.11, 0.10) = 1.4
    barely = [0.10, 0.10, 0.10, 0.124]  # 24% over: under the 25% bar
    tiny = [0.010, 0.010, 0.010, 0.019]  # 90% over, but 9 ms: a scheduler hiccup
    seen = [watch._stragglers(step, busy) for step, busy in enumerate([slow, slow, barely, slow, slow, slow, slow,
                                                                        fast, slow, slow, slow, tiny, tiny, tiny], 1)]
    events = [e for found in seen for e in found]
    assert [(e["step"], e["rank"], e["host"]) for e in events] == [(6, 3, "d"), (11, 3, "d")]
    assert events[0]["slower_by"] == pytest.approx(0.14 / 0.10 - 1)


def test_doctor_run_mistakes_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = {"no such run folder": ["--run", str(tmp_path / "missing")],
             "no metrics.jsonl": ["--run", str(tmp_path / "empty")],
             "--quick belong to the pre-flight check": ["--run", str(tmp_path / "empty"), "--quick"],
             "--matmul-tflops goes with --run": ["--matmul-tflops", "10"]}
    for message, argv in cases.items():
        assert cli_main(["doctor", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_a_run_logged_without_time_fields_gets_no_time_findings(tmp_path):
    """An older run folder (no time/, memory/ or rank/ fields): the loss and throughput rules still read it."""
    rows = [{"step": s, "loss": 5.0 - 0.01 * s, "grad_norm": 1.0, "tokens_per_s": 1000.0, "lr": 1e-3} for s in range(1, 60)]
    assert diagnose(rows) == []
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_records(run) == rows
