"""Distributed building blocks on CPU with gloo, below the trainer: layout-invariant initialisation,
per-step losses equal to one process under FSDP2 (with activation checkpointing and compile) / HSDP /
FSDP x TP, raw DCP checkpoints that reshard between layouts (uneven shards included), runtime seeds,
and one-line errors for impossible layouts.

The reference is always an independent single-process run: `build_model` + torch's own AdamW and
clip_grad_norm_ on the whole global batch. The trainer-level tests (DDP / FSDP / TP / FSDP x TP
curves, resharding resumes through `trainer.run`, two torchrun nodes) are in test_parallel_trainer.py.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from spawn_helpers import leaves_without_teardown
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from smoltrain.config import Config, ModelConfig, ParallelConfig, config_from_dict
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model import loss as model_loss
from smoltrain.model.generate import generate
from smoltrain.model.transformer import build_model
from smoltrain.train import parallelize
from smoltrain.train.distributed import ParallelContext, resolve_layout, runtime_seed, setup_distributed
from smoltrain.train.optim import clip_grad_norm_
from smoltrain.train.parallelize import build_parallel_model, load_full_state_dict, set_gradient_sync

BATCH, SEQ, ACCUMULATION, STEPS, SAVE_AT = 8, 16, 2, 20, 10
LR, MAX_NORM = 1e-2, 0.5
REL_TOL = 1e-5
DEFAULT_LOSS_CHUNK = model_loss.LOSS_CHUNK_ELEMENTS
PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [90, 1, 2]]  # left-padded batch of unequal prompts
Z_LOSS = 1e-2


def make_config(parallel: dict | None = None, tied: bool = True, ac: bool = False, compile: bool = False,
                z_loss: float = 0.0) -> Config:
    # vocab 97: uneven FSDP and TP shards of the embedding and head.
    model = dict(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=SEQ, tie_embeddings=tied, nope_every=2, z_loss=z_loss,
    )
    train = dict(
        seed=3, global_batch_tokens=BATCH * SEQ, micro_batch_size=1, device="cpu", precision="fp32",
        activation_checkpointing=ac, compile="on" if compile else "off",
    )
    return config_from_dict({"model": model, "data": {"seq_len": SEQ}, "train": train, "parallel": parallel or {}})


def global_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A learnable stream: each document counts modulo vocab from a random start with stride 1-3;
    documents start at random places, so masking and restarting positions matter."""
    g = torch.Generator().manual_seed(1000 + step)
    new_document = torch.rand(BATCH, SEQ + 1, generator=g) < 0.15
    new_document[:, 0] = True
    document = new_document.long().cumsum(1) - 1
    starts = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g).gather(1, document)
    strides = torch.randint(1, 4, (BATCH, SEQ + 1), generator=g).gather(1, document)
    index = torch.arange(SEQ + 1).expand(BATCH, -1)
    first = torch.where(new_document, index, 0).cummax(1).values
    tokens = (starts + strides * (index - first)) % vocab
    return tokens[:, :-1], tokens[:, 1:], document[:, :-1].to(torch.int32)


def make_optimizer(model, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


def full_weights(model) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.clone() for name, tensor in state.items()}


def save_checkpoint(model, optimizer, path) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def load_checkpoint(model, optimizer, path) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def parallel_step(model, optimizer, ctx: ParallelContext, step: int, vocab: int) -> tuple[float, float]:
    """One optimizer step: this data-parallel rank's rows of the global batch (every dp_world-th)
    in ACCUMULATION micro-batches, gradients synchronised on the last one only; returns the global
    (loss, grad norm)."""
    ids, labels, documents = (t[ctx.dp_rank :: ctx.dp_world] for t in global_batch(step, vocab))
    micro = ids.shape[0] // ACCUMULATION
    total = torch.zeros(())
    for index in range(ACCUMULATION):
        set_gradient_sync(model, index == ACCUMULATION - 1)
        part = slice(index * micro, (index + 1) * micro)
        out = model(ids[part], labels=labels[part], document_ids=documents[part])
        (out.loss / ACCUMULATION).backward()
        total += out.loss.detach() / ACCUMULATION
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return ctx.all_reduce_dp(total).item(), norm.item()


# ----------------------------------------------------------------------------- single-process reference


@functools.lru_cache(maxsize=None)
def reference(tied: bool, checkpoint_dir: str | None = None, z_loss: float = 0.0) -> dict:
    """The 1-process run: initial weights, (loss, grad norm) per step, weights at SAVE_AT (and a DCP
    checkpoint there when checkpoint_dir is given) and at the end."""
    config = make_config(tied=tied, z_loss=z_loss)
    torch.manual_seed(0)
    model = build_model(config.model, config.train.seed)
    optimizer = make_optimizer(model)
    result = {"init": {k: v.clone() for k, v in model.state_dict().items()}, "steps": []}
    for step in range(STEPS):
        ids, labels, documents = global_batch(step, config.model.vocab_size)
        out = model(ids, labels=labels, document_ids=documents)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        result["steps"].append((out.loss.item(), norm.item()))
        if step + 1 == SAVE_AT:
            result["saved"] = {k: v.clone() for k, v in model.state_dict().items()}
            if checkpoint_dir is not None:
                save_checkpoint(model, optimizer, checkpoint_dir)
    result["final"] = {k: v.clone() for k, v in model.state_dict().items()}
    return result


def assert_same_curve(got: list, want: list, what: str, grad_tol: float = 1e-4) -> None:
    assert len(got) == len(want), what
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want)):
        assert abs(loss - ref_loss) <= REL_TOL * abs(ref_loss), f"{what} step {step}: loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= grad_tol * abs(ref_norm), f"{what} step {step}: grad norm {norm} vs {ref_norm}"


def assert_bit_identical(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"{what}: {different}"


# ----------------------------------------------------------------------------- multi-process harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _worker(rank: int, world: int, port: int, out_dir: str, cases: list[dict]) -> None:
    """One rank: run every case in order (each a layout, optionally loading/saving a checkpoint) and
    let rank 0 write what it saw to out_dir/<case>.pt."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # several ranks share 2 cores
    original_compile = parallelize.apply_compile
    # Inductor needs a minute per block on 2 cores; aot_eager traces the same graphs (forward and backward).
    parallelize.apply_compile = functools.partial(original_compile, backend="aot_eager")
    try:
        for case in cases:
            chunk_tokens = case.get("loss_chunk_tokens")
            model_loss.LOSS_CHUNK_ELEMENTS = chunk_tokens * 97 if chunk_tokens else DEFAULT_LOSS_CHUNK
            config = make_config(case["parallel"], tied=case.get("tied", True), ac=case.get("ac", False),
                                 compile=case.get("compile", False), z_loss=case.get("z_loss", 0.0))
            t = config.train
            ctx = setup_distributed(config.parallel, config.model, seed=t.seed, device="cpu", precision=t.precision,
                                    compile=t.compile)
            draws = torch.rand(3)
            model = build_parallel_model(config, ctx)
            record = {"init": full_weights(model), "steps": []}
            # fused: one kernel over DTensors from several meshes (what the trainer uses on CUDA).
            optimizer = make_optimizer(model, fused=case.get("fused", False))
            if case.get("generate"):  # from the initial weights, which equal the 1-process model's
                # After the optimizer: a no-grad forward leaves FSDP's root unsharded, and
                # model.parameters() would then hand the optimizer the temporary full tensors.
                record["generated"] = generate(model.eval(), PROMPTS, max_new_tokens=6)
                model.train()
            start = 0
            if case.get("load_full"):
                load_full_state_dict(model, torch.load(case["load_full"]))
                record["loaded_full"] = full_weights(model)
            if case.get("load"):
                load_checkpoint(model, optimizer, case["load"])
                record["loaded"] = full_weights(model)
                start = SAVE_AT
            for step in range(start, case.get("steps", STEPS)):
                record["steps"].append(parallel_step(model, optimizer, ctx, step, config.model.vocab_size))
                if case.get("save") and step + 1 == SAVE_AT:
                    save_checkpoint(model, optimizer, case["save"])
                    record["saved"] = full_weights(model)
            coordinates = torch.tensor([rank, ctx.dp_rank, ctx.tp_rank, ctx.mesh["tp"].get_local_rank(), ctx.seed % 2**31])
            everyone = [torch.zeros(5, dtype=torch.long) for _ in range(world)]
            dist.all_gather(everyone, coordinates)
            all_draws = [torch.zeros(3) for _ in range(world)]
            dist.all_gather(all_draws, draws)
            record["ranks"] = [dict(zip(("rank", "dp_rank", "tp_rank", "mesh_tp_rank", "seed"), c.tolist())) for c in everyone]
            record["draws"] = all_draws
            if rank == 0:
                torch.save(record, Path(out_dir) / f"{case['name']}.pt")
            dist.barrier()
    finally:
        parallelize.apply_compile = original_compile
        if dist.is_initialized():
            dist.destroy_process_group()


def run_cases(world: int, out_dir: Path, cases: list[dict]) -> dict[str, dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(out_dir), cases), nprocs=world, join=True)
    return {case["name"]: torch.load(out_dir / f"{case['name']}.pt") for case in cases}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is 10-50x faster than two that
    contend with the worker processes (measured 0.35 s vs 18 s for the 20-step reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def two_process(tmp_path_factory, checkpoints) -> dict[str, dict]:
    # DDP, TP with sequence parallel and 1 process -> FSDP 2 run through the trainer in test_parallel_trainer.py.
    cases = [
        {"name": "fsdp", "parallel": {}, "save": str(checkpoints / "fsdp")},
        {"name": "fsdp_ac_compile_untied", "parallel": {}, "tied": False, "ac": True, "compile": True},
        {"name": "tp_no_sp_from_fsdp", "parallel": {"tp": 2, "sequence_parallel": False}, "load": str(checkpoints / "fsdp")},
        # Loss parallel: the tied embedding/head split by vocabulary, logits never gathered, z-loss on;
        # compiled blocks fed by the vocabulary-parallel embedding.
        # Chunks of 24 tokens: each recomputed in backward, all-reduces included.
        {"name": "tp_loss_parallel", "parallel": {"tp": 2, "loss_parallel": True}, "z_loss": Z_LOSS, "compile": True,
         "loss_chunk_tokens": 24},
    ]
    return run_cases(2, tmp_path_factory.mktemp("two_process"), cases)


@pytest.fixture(scope="module")
def four_process(tmp_path_factory, checkpoints) -> dict[str, dict]:
    torch.save(reference(False)["final"], checkpoints / "untied_full.pt")  # not what the DCP checkpoint holds
    reference(False, str(checkpoints / "single_untied"))
    cases = [
        # TP + activation checkpointing + compile: traceable only with the checkpoint outside the compiled block.
        {"name": "fsdp_x_tp", "parallel": {"tp": 2}, "ac": True, "fused": True, "compile": True},
        # Uneven vocabulary shards under TP (row/column-wise) and FSDP (strided): loaded from full
        # tensors (imported weights), then from a 1-process DCP checkpoint, then trained on.
        {"name": "fsdp_x_tp_untied_no_sp", "parallel": {"tp": 2, "sequence_parallel": False}, "tied": False,
         "load_full": str(checkpoints / "untied_full.pt"), "load": str(checkpoints / "single_untied")},
        {"name": "hsdp", "parallel": {"dp_replicate": 2}, "generate": True},
        {"name": "fsdp_x_tp_loss_parallel_untied", "parallel": {"tp": 2, "loss_parallel": True}, "tied": False,
         "compile": True},
        # Generation with the KV cache holding each rank's heads only.
        {"name": "fsdp_x_tp_generate", "parallel": {"tp": 2, "sequence_parallel": False}, "generate": True, "steps": 0},
    ]
    return run_cases(4, tmp_path_factory.mktemp("four_process"), cases)


# ----------------------------------------------------------------------------- layout invariance


@pytest.mark.slow
def test_initial_full_weights_are_bit_identical_across_layouts(two_process, four_process):
    runs = {**two_process, **four_process}
    for name, run in runs.items():  # runs that load a checkpoint record their weights before loading
        tied = "untied" not in name
        assert_bit_identical(run["init"], reference(tied)["init"], f"{name} initial weights")


@pytest.mark.slow
def test_losses_match_single_process_for_fsdp_hsdp_and_fsdp_x_tp(two_process, four_process):
    runs = {**two_process, **four_process}
    for name in ("fsdp", "fsdp_ac_compile_untied", "fsdp_x_tp", "hsdp", "tp_loss_parallel",
                 "fsdp_x_tp_loss_parallel_untied"):
        want = reference("untied" not in name, z_loss=Z_LOSS if name == "tp_loss_parallel" else 0.0)["steps"]
        assert want[-1][0] < 0.75 * want[0][0], "the reference run must learn, or equal curves prove little"
        assert_same_curve(runs[name]["steps"], want, name)


@pytest.mark.slow
def test_greedy_generation_under_fsdp_x_tp_and_hsdp_equals_one_process(four_process):
    want = generate(build_model(make_config().model, make_config().train.seed).eval(), PROMPTS, max_new_tokens=6)
    assert len(set(map(tuple, want))) > 1, "different prompts should continue differently"
    for name in ("fsdp_x_tp_generate", "hsdp"):
        assert four_process[name]["generated"] == want, name


@pytest.mark.slow
def test_runtime_seeds_differ_across_data_parallel_ranks_and_agree_across_tensor_parallel_peers(four_process):
    run = four_process["fsdp_x_tp"]  # mesh (1, 2, 2): ranks 0,1 are dp 0; ranks 2,3 are dp 1
    ranks, draws = run["ranks"], run["draws"]
    assert [(r["dp_rank"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["tp_rank"] == r["mesh_tp_rank"] for r in ranks)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[2], draws[3])
    assert not torch.equal(draws[0], draws[2])
    assert runtime_seed(3, 0) != runtime_seed(3, 1)


# ----------------------------------------------------------------------------- resharding checkpoints


@pytest.mark.slow
def test_full_weights_load_into_fsdp_x_tp_shards(four_process):
    loaded = four_process["fsdp_x_tp_untied_no_sp"]["loaded_full"]
    assert_bit_identical(loaded, reference(False)["final"], "full state dict -> FSDP 2 x TP 2")


@pytest.mark.slow
def test_checkpoint_saved_by_one_process_resumes_under_fsdp2_x_tp2(four_process):
    run = four_process["fsdp_x_tp_untied_no_sp"]
    assert_bit_identical(run["loaded"], reference(False)["saved"], "1 process -> FSDP 2 x TP 2 weights")
    assert_same_curve(run["steps"], reference(False)["steps"][SAVE_AT:], "1 process -> FSDP 2 x TP 2")


@pytest.mark.slow
def test_checkpoint_saved_by_fsdp2_resumes_in_one_process(two_process, checkpoints):
    config = make_config()
    model = build_model(config.model, seed=123)  # different weights, so loading must overwrite them all
    optimizer = make_optimizer(model)
    load_checkpoint(model, optimizer, checkpoints / "fsdp")
    assert_bit_identical(full_weights(model), two_process["fsdp"]["saved"], "FSDP 2 -> 1 process weights")
    steps = []
    for step in range(SAVE_AT, STEPS):
        ids, labels, documents = global_batch(step, config.model.vocab_size)
        out = model(ids, labels=labels, document_ids=documents)
        out.loss.backward()
        steps.append((out.loss.item(), torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()))
        optimizer.step()
        optimizer.zero_grad()
    assert_same_curve(steps, reference(True)["steps"][SAVE_AT:], "FSDP 2 -> 1 process")


@pytest.mark.slow
def test_checkpoint_saved_by_fsdp2_resumes_under_tp2(two_process):
    run = two_process["tp_no_sp_from_fsdp"]
    assert_bit_identical(run["loaded"], two_process["fsdp"]["saved"], "FSDP 2 -> TP 2 weights")
    assert_same_curve(run["steps"], reference(True)["steps"][SAVE_AT:], "FSDP 2 -> TP 2")


# ----------------------------------------------------------------------------- bad layouts


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        ({"tp": 2}, 3, r"world size 3 is not divisible by parallel.dp_replicate x parallel.tp \(1 x 2\)"),
        ({"dp_replicate": 2, "dp_shard": 3}, 4, r"2 x 3 x 1 = 6 but the world size is 4"),
        ({"dp_shard": 1, "tp": 1}, 2, r"1 x 1 x 1 = 1 but the world size is 2"),
        ({"tp": 4}, 4, r"parallel.tp \(4\) must divide model.num_kv_heads \(2\)"),
        ({"ddp": True, "tp": 2}, 4, r"parallel.ddp .* cannot combine with parallel.tp > 1"),
    ],
)
def test_impossible_layout_is_a_one_line_config_error(parallel, world, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve_layout(ParallelConfig(**parallel), ModelConfig(num_heads=4, num_kv_heads=2, hidden_size=32), world)
    assert "\n" not in str(error.value)


def test_layout_resolves_dp_shard_from_the_world_size():
    model = ModelConfig(num_heads=4, num_kv_heads=2, hidden_size=32)
    assert resolve_layout(ParallelConfig(), model, 8) == (1, 8, 1)
    assert resolve_layout(ParallelConfig(tp=2), model, 8) == (1, 4, 2)
    assert resolve_layout(ParallelConfig(dp_replicate=2, tp=2), model, 8) == (2, 2, 2)


def test_world_size_mismatch_fails_before_any_process_group_or_allocation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = make_config({"tp": 2})
    with pytest.raises(ConfigError, match="world size 3"):
        setup_distributed(config.parallel, config.model, device="cpu")
    assert not dist.is_initialized()  # no rendezvous was attempted (it would have hung on MASTER_ADDR)


def test_sequence_parallel_needs_sequence_lengths_divisible_by_tp():
    from smoltrain.train.distributed import check_layout
    from smoltrain.train.pretrain import check_pretrain_batches

    config = config_from_dict(
        {"model": {"max_seq_len": 64}, "data": {"seq_len": 15}, "train": {"global_batch_tokens": 15 * 8}}
    )
    ctx = ParallelContext(0, 0, 2, 1, 1, 2, False, torch.device("cpu"), None, 0)  # no mesh: must fail first
    with pytest.raises(ConfigError, match=r"sequence length 15 must be divisible by parallel.tp \(2\)"):
        check_layout(config, ctx)
    config.parallel.sequence_parallel = False
    check_layout(config, ctx)
    ctx = ParallelContext(0, 0, 4, 1, 4, 1, False, torch.device("cpu"), None, 0)  # 8 sequences, dp 4 x micro 8
    with pytest.raises(ConfigError, match=r"micro_batch_size x seq_len x data-parallel ranks \(8 x 15 x 4 = 480\)"):
        check_pretrain_batches(config, ctx)


def test_full_weights_that_do_not_fit_are_a_one_line_checkpoint_error():
    model = build_model(make_config().model, seed=0)
    state = {k: v.clone() for k, v in reference(True)["init"].items()}
    state["norm.weight"] = torch.ones(31)
    with pytest.raises(CheckpointError, match=r"norm.weight is \(31,\), expected \(32,\)") as error:
        load_full_state_dict(model, state)
    assert "\n" not in str(error.value)
    del state["norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight'\]"):
        load_full_state_dict(model, state)


def test_one_process_build_equals_build_model():
    """Without torchrun the recipe is a no-op apart from activation checkpointing: same weights, same names."""
    config = make_config(ac=True)
    ctx = setup_distributed(config.parallel, config.model, seed=config.train.seed, device="cpu")
    assert (ctx.world_size, ctx.dp_world, ctx.tp, ctx.mesh) == (1, 1, 1, None)
    model = build_parallel_model(config, ctx)
    assert_bit_identical(full_weights(model), reference(True)["init"], "1-process parallel build")
