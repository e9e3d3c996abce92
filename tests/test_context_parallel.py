"""Context parallelism on 2 gloo ranks equals one process: loss and every gradient of a model with NoPE
layers, GQA and document masking, the sequence split load-balanced (each rank an early and a late chunk)."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn_helpers import leaves_without_teardown

from smoltrain.config import ModelConfig, ParallelConfig
from smoltrain.errors import ConfigError
from smoltrain.model.transformer import build_model
from smoltrain.train.context_parallel import chunk_indices, shard_sequence
from smoltrain.train.distributed import resolve_layout

CONFIG = dict(vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64,
              max_seq_len=64, nope_every=2, document_masking=True)
SEQ = 48


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, SEQ + 1), generator=g)
    # Documents that cross chunk boundaries (chunks are 12 tokens on 2 ranks).
    documents = torch.tensor([[0] * 7 + [1] * 20 + [2] * 21, [0] * 30 + [1] * 18])
    return ids[:, :-1], ids[:, 1:], documents


@leaves_without_teardown
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(ModelConfig(**CONFIG), seed=0)
        input_ids, labels, documents = _batch()
        part = shard_sequence(input_ids, labels, documents, True, None, rank, world)
        out = model(**part, reduction="sum")
        tokens = out.num_tokens.clone().float()
        dist.all_reduce(tokens)
        (out.loss / tokens).backward()  # the mean over the whole sequence, as one process takes it
        loss = out.loss.detach() / tokens
        dist.all_reduce(loss)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        for grad in grads.values():  # cp ranks sum their gradients, as data-parallel ranks do
            dist.all_reduce(grad)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, Path(out_dir) / "cp.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cp_ranks_give_one_process_loss_and_gradients_with_document_masking(tmp_path, one_thread):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "cp.pt")
    model = build_model(ModelConfig(**CONFIG), seed=0)
    input_ids, labels, documents = _batch()
    reference = model(input_ids, labels=labels, document_ids=documents).loss
    reference.backward()
    assert got["loss"].item() == pytest.approx(reference.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_chunks_are_load_balanced_and_cover_the_sequence_once():
    pieces = [chunk_indices(48, 3, r) for r in range(3)]
    assert sorted(torch.cat(pieces).tolist()) == list(range(48))
    assert pieces[0].tolist() == list(range(0, 8)) + list(range(40, 48))
    # Causal work per rank (keys each query sees) is equal: early chunk + late chunk.
    assert len({int((p + 1).sum()) for p in pieces}) == 1
    with pytest.raises(ConfigError, match="multiple of 2 x cp"):
        chunk_indices(50, 3, 0)


@pytest.mark.parametrize("layout,world,message", [
    (dict(cp=2, tp=2, dp_shard=-1), 8, None),
    (dict(cp=2, dp_shard=-1), 4, None),
    (dict(cp=3, dp_shard=-1), 4, r"parallel.dp_replicate x parallel.cp x parallel.tp \(1 x 3 x 1\)"),
    (dict(cp=2, dp_shard=3), 4, "dp_replicate x dp_shard x cp x tp = 1 x 3 x 2 x 1 = 6"),
    (dict(cp=0), 2, "parallel.cp"),
])
def test_the_mesh_with_cp_is_validated_once_with_one_line_errors(layout, world, message):
    model = ModelConfig(**CONFIG)
    if message is None:
        tp = layout.get("tp", 1)
        assert resolve_layout(ParallelConfig(**layout), model, world) == (1, world // (layout["cp"] * tp), tp)
        return
    with pytest.raises(ConfigError, match=message) as error:
        resolve_layout(ParallelConfig(**layout), model, world)
    assert "\n" not in str(error.value)


def test_plan_shows_memory_per_device_with_cp_by_the_formula():
    from smoltrain.config import config_from_dict
    from smoltrain.model.flops import training_memory_bytes
    from smoltrain.train.plan import plan

    def layout(cp):
        return config_from_dict({"model": {"max_seq_len": 65536}, "data": {"seq_len": 65536},
                                 "train": {"global_batch_tokens": 65536 * 4, "micro_batch_size": 1},
                                 "parallel": {"cp": cp}})

    one, two = plan(layout(1), gpus=4), plan(layout(2), gpus=4)
    assert two["layout"]["cp"] == 2 and two["layout"]["dp_shard"] == 2
    m = layout(2).model
    expected = training_memory_bytes(m, 1, 32768, num_shards=4)
    gathered = m.num_layers * 2 * 32768 * m.num_kv_heads * m.resolved_head_dim * 2  # the other rank's keys and values
    assert two["memory_per_device_gb"]["activations"] == pytest.approx((expected["activations"] + gathered) / 2**30)
    assert two["memory_per_device_gb"]["weights"] == one["memory_per_device_gb"]["weights"]  # still sharded over 4
    assert two["memory_per_device_gb"]["activations"] < 0.6 * one["memory_per_device_gb"]["activations"]
