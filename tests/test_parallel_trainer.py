"""Distributed training through the real trainer: `trainer.run` in spawned gloo processes and
`smoltrain train` under torchrun. Per-step losses, gradient norms and the final validation loss
under DDP / FSDP 2 / TP 2 / FSDP 2 x TP 2 equal the 1-process trainer's; checkpoints reshard
(FSDP 2 -> 1 process, 1 -> FSDP 2, FSDP 2 -> TP 2) with the loader position re-split; a sharded
checkpoint exports to transformers; impossible layouts are one-line errors before any allocation;
two torchrun "nodes" on the loopback interface train like one process.

The reference is the trainer in this process with no parallel layout; the data are tiny token shards
and the constant schedule makes a short run's learning rates those of a long one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn_helpers import leaves_without_teardown
from synthetic_shards import write_random_documents

from smoltrain.cli import main as cli_main
from smoltrain.config import config_from_dict
from smoltrain.eval.during_training import DuringTraining
from smoltrain.train import trainer
from smoltrain.train.checkpoint import load_model_from_checkpoint

STEPS, SAVE_AT = 20, 10
REL_TOL = 1e-5  # losses (float32); gradient norms get 1e-4


# ----------------------------------------------------------------------------- data and config


def write_two_sources(root: Path) -> None:
    """Two training sources with disjoint token ranges, a validation set and a byte tokenizer under `root`."""
    write_random_documents(root / "low", "low", 1, 100, 6000, seed=1)
    write_random_documents(root / "high", "high", 100, 200, 6000, seed=2)
    write_random_documents(root / "val", "val", 1, 100, 1000, seed=3)
    write_byte_tokenizer(root / "tokenizer.json")


def write_byte_tokenizer(path: Path) -> None:
    """Byte-level BPE without merges: token i is one byte, 256 is end of text (bits per byte are exact)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of))}
    tokenizer = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))


def _byte_of(char: str) -> int:
    """GPT-2's byte -> character table, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    return sorted(set(range(256)) - set(printable))[ord(char) - 256]


def make_config(root: Path, out_dir: Path, parallel: dict | None = None, **train):
    # vocab 257: uneven FSDP and TP shards of the embedding and the untied head.
    return config_from_dict({
        "model": {"vocab_size": 257, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 16, "nope_every": 2, "tie_embeddings": False},
        "data": {"sources": {"low": str(root / "low"), "high": str(root / "high")},
                 "validation": {"low": str(root / "val")}, "tokenizer": str(root / "tokenizer.json"), "seq_len": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "constant"},
        "train": {"out_dir": str(out_dir), "max_steps": STEPS, "log_every": 1, "save_every": SAVE_AT,
                  "eval_every": 1000, "keep_checkpoints": 3, "global_batch_tokens": 128, "micro_batch_size": 2,
                  "tensorboard": False, "device": "cpu", "compile": "off", **train},
        # 3 validation batches and 9 batches of task rows: with 2 data-parallel ranks one pads a forward.
        "eval": {"val_batches": 3, "batch_size": 4, "tasks": ["arithmetic_choice"], "limit": 9},
        "parallel": parallel or {},
    })


def steps(out_dir: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"]) for m in lines if "loss" in m and "event" not in m]


def final_eval(out_dir: Path) -> dict:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval" in m][-1]["eval"]


def final_val(out_dir: Path) -> dict:
    return final_eval(out_dir)["val"]["low"]


def assert_same_curve(got: list, want: list, what: str) -> None:
    assert [s for s, *_ in got] == [s for s, *_ in want], f"{what}: steps"
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(got, want):
        assert abs(loss - ref_loss) <= REL_TOL * abs(ref_loss), f"{what} step {step}: loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= 1e-4 * abs(ref_norm), f"{what} step {step}: grad norm {norm} vs {ref_norm}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores: more threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel_trainer")
    write_two_sources(root)
    return root


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """The 1-process trainer run: 20 steps, checkpoints at 10 and 20."""
    out = root / "single"
    trainer.run(make_config(root, out), evaluation=DuringTraining())
    curve = steps(out)
    assert curve[-1][1] < 0.9 * curve[0][1], "the reference run must learn, or equal curves prove little"
    return out


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@leaves_without_teardown
def _worker(rank: int, world: int, root: str, cases: list[dict], ports: list[int]) -> None:
    """One torchrun-like rank: each case is one `trainer.run`, which starts and ends the process group."""
    torch.set_num_threads(1)
    for case, port in zip(cases, ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        config = make_config(Path(root), Path(root) / case["name"], case["parallel"])
        trainer.run(config, resume=case.get("resume"), evaluation=DuringTraining())
        assert not dist.is_initialized(), "the trainer ends the process group it started"


def spawn(root: Path, world: int, cases: list[dict]) -> None:
    mp.spawn(_worker, args=(world, str(root), cases, _free_ports(len(cases))), nprocs=world, join=True)


@pytest.fixture(scope="module")
def two_process(root, reference) -> Path:
    spawn(root, 2, [
        {"name": "ddp", "parallel": {"ddp": True}},
        {"name": "fsdp", "parallel": {}},
        {"name": "tp", "parallel": {"tp": 2}},
        {"name": "tp_loss_parallel", "parallel": {"tp": 2, "loss_parallel": True}},  # validation gathers logits
        # Resharding resumes: the loader position (global sequences) is re-split for the new dp degree.
        {"name": "tp_from_fsdp", "parallel": {"tp": 2}, "resume": str(root / "fsdp" / "checkpoints" / "step_00000010")},
        {"name": "fsdp_from_single", "parallel": {}, "resume": str(reference / "checkpoints" / "step_00000010")},
    ])
    return root


@pytest.fixture(scope="module")
def four_process(root, reference) -> Path:
    spawn(root, 4, [{"name": "fsdp_x_tp", "parallel": {"tp": 2}}])
    return root


# ----------------------------------------------------------------------------- equal curves


@pytest.mark.slow
def test_trainer_losses_match_one_process_under_ddp_fsdp_tp_and_fsdp_x_tp(reference, two_process, four_process):
    want = steps(reference)
    assert [s for s, *_ in want] == list(range(1, STEPS + 1))
    for name in ("ddp", "fsdp", "tp", "tp_loss_parallel", "fsdp_x_tp"):
        assert_same_curve(steps(two_process / name), want, name)
        # Validation batches split over the data-parallel ranks, summed: the same tokens, the same loss.
        ref_val, val = final_val(reference), final_val(two_process / name)
        assert val["tokens"] == ref_val["tokens"] and abs(val["loss"] - ref_val["loss"]) <= REL_TOL * ref_val["loss"], name
        # Multiple-choice requests split over data-parallel ranks too: the same accuracies.
        task = final_eval(two_process / name)["tasks"]["arithmetic_choice"]
        assert task["n"] == 9 and task == pytest.approx(final_eval(reference)["tasks"]["arithmetic_choice"], abs=1e-9), name


@pytest.mark.slow
def test_only_rank_zero_writes_run_files_but_every_rank_its_checkpoint_shard(two_process):
    run = two_process / "fsdp"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"eval"' not in line]) == STEPS  # not one line per rank
    checkpoint = run / "checkpoints" / "step_00000020"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["layout"] == [1, 2, 1] and len(state["rng"]) == 2
    assert json.loads((run / "summary.json").read_text())["finished"]


# ----------------------------------------------------------------------------- resharding resume


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_under_tp2_and_one_checkpoint_under_fsdp2(reference, two_process):
    want = steps(reference)[SAVE_AT:]
    assert_same_curve(steps(two_process / "tp_from_fsdp"), want, "FSDP 2 -> TP 2")
    assert_same_curve(steps(two_process / "fsdp_from_single"), want, "1 process -> FSDP 2")


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_in_one_process(root, reference, two_process):
    out = root / "single_from_fsdp"
    trainer.run(make_config(root, out), resume=str(two_process / "fsdp" / "checkpoints" / "step_00000010"), evaluation=DuringTraining())
    assert_same_curve(steps(out), steps(reference)[SAVE_AT:], "FSDP 2 -> 1 process")


@pytest.mark.slow
def test_export_from_a_sharded_checkpoint(root, reference, two_process, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    run = two_process / "fsdp"
    model, _ = load_model_from_checkpoint(run)  # one process reads two ranks' shards
    dcp_to_torch_save(run / "checkpoints" / "step_00000020", tmp_path / "full.pt")  # torch's own reader
    saved = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    ours = model.state_dict()
    assert sorted(saved) == sorted(k for k in ours if not k.startswith("rope_"))
    assert all(torch.equal(saved[k], ours[k]) for k in saved)

    assert cli_main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    single, _ = load_model_from_checkpoint(reference)
    ids = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(ids).logits
        assert torch.allclose(got, model(ids), atol=1e-4)
        # ... and the sharded run trained the same model as the 1-process one. 20 steps at lr 1e-2 let the two
        # reduction orders drift apart by ~1e-4 on logits of size ~4 (1.09e-4 on an AVX-512 Xeon): a relative bound.
        torch.testing.assert_close(got, single(ids), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad layouts through the CLI


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (3, ["parallel.tp=2"], "world size 3 is not divisible by parallel.dp_replicate x parallel.tp (1 x 2)"),
        (4, ["parallel.dp_shard=3"], "1 x 3 x 1 = 3 but the world size is 4"),
        (4, ["parallel.tp=4"], "parallel.tp (4) must divide model.num_kv_heads (2)"),
        (1, ["parallel.tp=2", "eval.tasks=[arithmetic]"], "generative tasks (arithmetic_answer) decode one token at a time"),
    ],
)
def test_impossible_layout_is_one_line_and_exit_2_before_any_allocation(root, tmp_path, monkeypatch, capsys,
                                                                        world, overrides, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make_config(root, tmp_path / "run").to_yaml())
    # As torchrun would set them, with no rendezvous behind: reaching init_process_group would hang.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    built = []
    monkeypatch.setattr(trainer, "build_parallel_model", lambda *a, **k: built.append(1))
    args = [arg for o in overrides for arg in ("--set", o)]
    assert cli_main(["train", str(recipe), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not dist.is_initialized() and not built and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- multi-node


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_run_smoltrain_train(root, reference, tmp_path):
    """Two torchrun agents (one process each) meet through a c10d rendezvous, as two nodes would, and
    run the CLI verb: FSDP over both, 5 steps, the 1-process curve."""
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "run"
    recipe.write_text(make_config(root, out, max_steps=5).to_yaml())
    port = _free_ports(1)[0]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=loopback-{port}",
        "--local_addr=127.0.0.1", "--max_restarts=0", "-m", "smoltrain", "train", str(recipe),
    ]
    logs = [tmp_path / f"node{index}.log" for index in range(2)]
    nodes = []
    for log in logs:
        with log.open("w") as sink:
            nodes.append(subprocess.Popen(command, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline, codes = time.monotonic() + 180, []
    for node in nodes:
        try:
            codes.append(node.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:  # a hung rendezvous: end the agent and its worker
            os.killpg(node.pid, 9)
            codes.append(node.wait())
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert_same_curve(steps(out), steps(reference)[:5], "two torchrun nodes")
    assert "2 ranks = dp_shard 2 (FSDP2)" in "".join(log.read_text() for log in logs)
    state = json.loads((out / "checkpoints" / "step_00000005" / "train_state.json").read_text())
    assert state["layout"] == [1, 2, 1] and state["loader"]["sequence"] == 5 * 8
