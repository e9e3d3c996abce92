"""In-training multiple-choice evaluation under tensor parallel with sequence parallel: scoring
batches whose longest row has an odd number of tokens are padded to a multiple of the TP degree
(sequence parallel splits the sequence over the TP ranks), and the scores equal one process's.

Byte tokenizer (one token per byte), so the rows' lengths are those of the strings.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn_helpers import leaves_without_teardown
from test_parallel_trainer import write_byte_tokenizer

from smoltrain.config import config_from_dict
from smoltrain.eval.during_training import evaluate_during_training, sequence_multiple
from smoltrain.eval.run import resolve_tasks, score_tasks
from smoltrain.eval.scoring import load_tokenizer
from smoltrain.model.transformer import build_model

# Query + choice lengths in bytes: the scored rows (context + answer, less the last token) have
# 5, 7, 8, 9, 11 tokens, so with 2 rows per batch most batches have an odd width.
ITEMS = [
    {"query": "1+1=", "choices": [" 2", " 3"], "gold": 0},
    {"query": "2+2 =", "choices": [" 4", " 5", " 44"], "gold": 0},
    {"query": "three+1=", "choices": [" 4", " 5"], "gold": 0},
    {"query": "what is 7-3?", "choices": [" 4", " 3 "], "gold": 0},
    {"query": "9/3=", "choices": [" 3", " 333", " 1"], "gold": 0},
]


def make_config(root: Path, parallel: dict) -> object:
    return config_from_dict({
        "model": {"vocab_size": 258, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32, "nope_every": 2},
        "data": {"tokenizer": str(root / "tokenizer.json"), "seq_len": 16},
        "train": {"device": "cpu", "compile": "off", "global_batch_tokens": 32, "micro_batch_size": 2,
                  "out_dir": str(root / "run")},
        "eval": {"tasks": [str(root / "odd.jsonl")], "batch_size": 2, "val_batches": 0},
        "parallel": parallel,
    })


def logprobs(model, config, pad_multiple: int) -> list[list[float]]:
    """Each item's per-choice log-likelihoods, as the trainer's evaluation scores them."""
    details: list = []
    score_tasks(model, load_tokenizer(config.data.tokenizer), resolve_tasks(config.eval.tasks), config.eval.batch_size,
                progress=False, details=details, pad_multiple=pad_multiple)
    return [d["logprobs"] for d in details]


@leaves_without_teardown
def _worker(rank: int, world: int, port: int, root: str) -> None:
    from smoltrain.train.distributed import setup_distributed
    from smoltrain.train.parallelize import build_parallel_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = make_config(Path(root), {"tp": 2, "dp_shard": 1, "sequence_parallel": True})
    logger, lines = logging.getLogger("smoltrain.train.distributed"), []
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.Handler())
    logger.handlers[-1].emit = lambda record: lines.append(record.getMessage())
    ctx = setup_distributed(config.parallel, config.model, seed=0, device="cpu")
    try:
        model = build_parallel_model(config, ctx).eval()
        with torch.no_grad():
            result = evaluate_during_training(model, config, "cpu")
            result["logprobs"] = logprobs(model, config, sequence_multiple(config))
        result["log"] = lines
        if rank == 0:
            (Path(root) / "tp.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multiple_choice_eval_under_tp2_sequence_parallel_with_odd_widths_equals_one_process(tmp_path, one_thread):
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    widths = {len(item["query"] + choice) - 1 for item in ITEMS for choice in item["choices"]}
    assert any(w % 2 for w in widths), "the rows must include odd lengths, or this proves nothing"

    config = make_config(tmp_path, {})
    model = build_model(config.model, seed=config.train.seed).eval()  # the same initial weights as any layout
    with torch.no_grad():
        want = evaluate_during_training(model, config, "cpu")
        want_logprobs = logprobs(model, config, 1)

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "tp.json").read_text())
    assert got["log"] == ["distributed: world 2 = dp_replicate 1 x dp_shard 1 x tp 2 (no data parallel, gloo)"]
    assert got["tasks"]["odd"]["n"] == len(ITEMS)
    assert got["tasks"]["odd"] == pytest.approx(want["tasks"]["odd"], abs=1e-9)
    # Right padding is invisible to causal attention: the same log-likelihoods as unpadded rows.
    assert sum(map(len, got["logprobs"])) == sum(len(item["choices"]) for item in ITEMS)
    for row, ref in zip(got["logprobs"], want_logprobs):
        assert row == pytest.approx(ref, rel=1e-5)
