"""Context parallelism through the real trainer: `trainer.run` with parallel.cp=2 on 2 gloo ranks trains
like one process (per-step losses and gradient norms, final validation), with document masking and a NoPE
layer; a cp=2 checkpoint resumes at cp=2 and at cp=1 on the same curve; unsupported layouts are one-line
errors before any process group.

The data, model and reference helpers are test_parallel_trainer.py's (sequences of 16 tokens: 4 chunks
of 4, documents of 10-60 tokens crossing them; NoPE every 2nd of 2 layers; document_masking on).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from spawn_helpers import leaves_without_teardown
from test_parallel_trainer import _free_ports, assert_same_curve, final_val, make_config, steps, write_two_sources

from smoltrain.cli import main as cli_main
from smoltrain.stages import pretrain

STEPS, SAVE_AT = 8, 4  # 4 micro-batches a step (128 tokens / (2 rows x 16)): 32 cp forwards per run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cp_trainer")
    write_two_sources(root)
    return root


def _config(root: Path, name: str, parallel: dict | None = None, **train):
    config = make_config(root, root / name, parallel, max_steps=STEPS, save_every=SAVE_AT, **train)
    assert config.model.document_masking and config.model.nope_every == 2  # what the CP mask must respect
    return config


@pytest.fixture(scope="module")
def reference(root) -> Path:
    torch.set_num_threads(1)
    pretrain(_config(root, "single"))
    return root / "single"


@leaves_without_teardown
def _worker(rank: int, world: int, root: str, cases: list[dict], ports: list[int]) -> None:
    torch.set_num_threads(1)
    for case, port in zip(cases, ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        pretrain(_config(Path(root), case["name"], case["parallel"], **case.get("train", {})), resume=case.get("resume"))


@pytest.fixture(scope="module")
def cp_runs(root, reference) -> Path:
    cases = [
        {"name": "cp", "parallel": {"cp": 2}},  # FSDP2 over the flattened dp_shard x cp mesh (1 x 2)
        {"name": "cp_ddp", "parallel": {"cp": 2, "ddp": True}},  # DDP over dp x cp instead
        # Recomputed blocks gather keys and values again in backward: the same collectives in the same order.
        {"name": "cp_checkpointing", "parallel": {"cp": 2}, "train": {"activation_checkpointing": True}},
        {"name": "cp_resumed", "parallel": {"cp": 2}, "resume": str(root / "cp" / "checkpoints" / f"step_{SAVE_AT:08d}")},
    ]
    mp.spawn(_worker, args=(2, str(root), cases, _free_ports(len(cases))), nprocs=2, join=True)
    return root


@pytest.mark.slow
def test_cp2_trains_like_one_process_with_document_masking_and_nope(reference, cp_runs):
    want = steps(reference)
    assert want[-1][1] < 0.97 * want[0][1], "the reference must learn (5.55 -> 5.30), or equal curves prove little"
    for name in ("cp", "cp_ddp", "cp_checkpointing"):
        assert_same_curve(steps(cp_runs / name), want, name)
        # Validation runs whole sequences on every cp rank: the one-process numbers.
        assert final_val(cp_runs / name) == pytest.approx(final_val(reference), rel=1e-5), name
    state = json.loads((cp_runs / "cp" / "checkpoints" / f"step_{STEPS:08d}" / "train_state.json").read_text())
    assert state["layout"] == [1, 1, 1, 2] and state["loader"]["sequence"] == STEPS * 8  # cp ranks read the same rows


@pytest.mark.slow
def test_cp2_checkpoint_resumes_at_cp2_and_in_one_process(root, reference, cp_runs):
    want = steps(reference)[SAVE_AT:]
    assert_same_curve(steps(cp_runs / "cp_resumed"), want, "cp 2 -> cp 2")
    torch.set_num_threads(1)
    pretrain(_config(root, "single_from_cp"), resume=str(cp_runs / "cp" / "checkpoints" / f"step_{SAVE_AT:08d}"))
    assert_same_curve(steps(root / "single_from_cp"), want, "cp 2 -> 1 process")


@pytest.mark.parametrize("world, overrides, message", [
    (2, ["parallel.cp=2", "data.seq_len=18", "model.max_seq_len=18", "train.global_batch_tokens=144"],
     "sequence length 18 must be a multiple of 2 x cp = 4"),
    (4, ["parallel.cp=2", "parallel.tp=2"], "parallel.cp (2) with parallel.tp"),
    (2, ["parallel.cp=2", "model.num_experts=4"], "parallel.cp (2) with parallel.ep / model.num_experts"),
])
def test_unsupported_cp_layouts_are_one_line_errors_before_any_group(root, tmp_path, monkeypatch, capsys, world, overrides, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make_config(root, tmp_path / "run").to_yaml())
    # As torchrun would set them, with no rendezvous behind: reaching init_process_group would hang.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert cli_main(["train", str(recipe), *[arg for o in overrides for arg in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
