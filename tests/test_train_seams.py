"""The one training loop's seams: the pure spike/non-finite `guard`; a masked objective whose loss
and gradients do not depend on how its label tokens fall into micro-batches or data-parallel ranks
(1 process vs FSDP 2 / DDP 2 on gloo), equal to one big batch computed directly; and the `Trainer`
itself: should_stop saves and stops, an objective's stateful part round-trips through a checkpoint,
tokens count real label tokens, and the save of a step comes before its evaluation."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pretrain_helpers import tiny_pretrain_config
from spawn_helpers import leaves_without_teardown

from smoltrain.config import config_from_dict
from smoltrain.model.transformer import build_model, token_logprobs
from smoltrain.train import trainer
from smoltrain.train.checkpoint import find_checkpoint
from smoltrain.train.distributed import single_process_context
from smoltrain.train.pretrain import PretrainObjective, build_pretrain_objective
from smoltrain.train.trainer import Trainer, Verdict, forward_backward, guard

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, ROWS = 97, 12, 8
# Share of labels kept per row: half overall, dense on rank 0's rows (0, 2, 4, 6), sparse on rank 1's,
# and uneven between the micro-batches of each rank.
KEEP = [0.95, 0.3, 0.8, 0.05, 0.9, 0.2, 0.6, 0.2]


# ----------------------------------------------------------------------------- guard


def test_guard_skips_non_finite_steps_whatever_the_spike_action():
    for action in ("warn", "skip", "rewind"):
        assert guard(float("nan"), 1.0, 5.0, action) == Verdict("skip", "nonfinite")
        assert guard(1.0, float("inf"), 5.0, action) == Verdict("skip", "nonfinite")
        assert guard(float("inf"), 1.0, None, action) == Verdict("skip", "nonfinite")


def test_guard_handles_a_spike_as_the_spike_action_says():
    assert guard(6.0, 1.0, 5.0, "warn") == Verdict("update", "spike")
    assert guard(6.0, 1.0, 5.0, "skip") == Verdict("skip", "spike")
    assert guard(6.0, 1.0, 5.0, "rewind") == Verdict("rewind", "spike")


def test_guard_updates_normal_steps_and_before_the_spike_window_is_known():
    assert guard(4.9, 1e6, 5.0, "rewind") == Verdict("update", None)  # a large norm is clipping's business
    assert guard(5.0, 1.0, 5.0, "skip") == Verdict("update", None)  # a spike exceeds the threshold
    assert guard(1e9, 1.0, None, "skip") == Verdict("update", None)  # no threshold yet: no spike


# ----------------------------------------------------------------------------- a masked objective


def tiny_config(parallel: dict | None = None):
    return config_from_dict({
        "model": {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 16, "tie_embeddings": False},
        "data": {"seq_len": SEQ},
        "train": {"seed": 5, "global_batch_tokens": ROWS * SEQ, "micro_batch_size": 1, "device": "cpu",
                  "precision": "fp32", "compile": "off"},
        "parallel": parallel or {},
    })


def masked_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    labels = tokens[:, 1:].clone()
    keep = torch.rand(ROWS, SEQ, generator=g) < torch.tensor(KEEP)[:, None]
    labels[~keep] = -100
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}


class MaskedObjective:
    """An SFT-like objective: the summed log-likelihood of the labelled tokens only."""

    name = "masked"
    batches = None

    def loss(self, model, batch):
        logprobs = token_logprobs(model, batch["input_ids"], batch["labels"])
        count = (batch["labels"] != -100).sum()
        return -logprobs.sum(), count, {"labelled": (count.float(), 1)}


def split(batch: dict, rows: list[int], parts: int) -> list[dict]:
    picked = {k: v[rows] for k, v in batch.items()}
    size = len(rows) // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in picked.items()} for i in range(parts)]


def one_big_batch(batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean cross-entropy of all labelled tokens in one forward, written out (no objective)."""
    model = build_model(tiny_config().model, seed=5)
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(result, grads: dict, want_loss: float, want_grads: dict, what: str) -> None:
    assert result.loss == pytest.approx(want_loss, rel=1e-6), what
    assert result.tokens == int((masked_batch()["labels"] != -100).sum()), what
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-7, msg=f"{what}: {name}")
    norm = torch.cat([g.flatten() for g in want_grads.values()]).norm().item()
    assert result.grad_norm == pytest.approx(norm, rel=1e-5), what


def test_masked_objective_is_unbiased_by_the_micro_batch_split():
    batch = masked_batch()
    assert 0.4 < (batch["labels"] != -100).float().mean() < 0.6  # half the labels ignored
    want_loss, want_grads = one_big_batch(batch)
    reference = build_model(tiny_config().model, seed=5)
    ctx = single_process_context(torch.device("cpu"))
    for parts in (1, 2, 4, 8):
        model = copy.deepcopy(reference)
        micro = split(batch, list(range(ROWS)), parts)
        result = forward_backward(model, MaskedObjective(), micro, ctx, grad_clip=0.0)
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert_same_step(result, grads, want_loss, want_grads, f"{parts} micro-batches")
        assert result.metrics == {"labelled": pytest.approx(sum(int((m["labels"] != -100).sum()) for m in micro) / parts)}
    # The data are uneven enough that averaging per-micro-batch means would be visibly biased.
    means = [F.cross_entropy(reference(m["input_ids"]).flatten(0, 1), m["labels"].flatten(), ignore_index=-100).item()
             for m in split(batch, list(range(ROWS)), 4)]
    assert abs(sum(means) / 4 - want_loss) > 1e-4 * want_loss  # 1000x float rounding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _rank(rank: int, world: int, ports: list[int], out_dir: str) -> None:
    from smoltrain.train.distributed import setup_distributed
    from smoltrain.train.parallelize import build_parallel_model

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    batch = masked_batch()
    try:
        # A fresh rendezvous port per process group: re-initialising on the port of a group just
        # destroyed can hang while its store is still being torn down.
        for (name, parallel), port in zip((("fsdp", {}), ("ddp", {"ddp": True})), ports):
            os.environ["MASTER_PORT"] = str(port)
            config = tiny_config(parallel)
            ctx = setup_distributed(config.parallel, config.model, seed=config.train.seed, device="cpu")
            model = build_parallel_model(config, ctx)
            # This rank's rows (every world-th), in 2 micro-batches of uneven label counts.
            micro = split(batch, list(range(rank, ROWS, world)), 2)
            result = forward_backward(model, MaskedObjective(), micro, ctx, grad_clip=0.0)
            grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for n, p in model.named_parameters()}
            if rank == 0:
                torch.save({"result": tuple(result), "grads": grads}, Path(out_dir) / f"{name}.pt")
            dist.barrier()
            dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_masked_objective_is_unbiased_by_the_data_parallel_split(tmp_path):
    batch = masked_batch()
    want_loss, want_grads = one_big_batch(batch)
    mp.spawn(_rank, args=(2, [_free_port(), _free_port()], str(tmp_path)), nprocs=2, join=True)
    for name in ("fsdp", "ddp"):
        saved = torch.load(tmp_path / f"{name}.pt")
        assert_same_step(trainer.StepResult(*saved["result"]), saved["grads"], want_loss, want_grads, name)


# ----------------------------------------------------------------------------- the Trainer


def losses(out_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m and "event" not in m]


def test_should_stop_saves_and_stops_and_the_rerun_continues_identically(two_sources, tmp_path):
    straight = Trainer(tiny_pretrain_config(two_sources, tmp_path / "straight")).train()
    config = tiny_pretrain_config(two_sources, tmp_path / "run")
    run = Trainer(config, should_stop=lambda: run.state.step >= 2)
    stopped = run.train()
    assert stopped["stopped_by"] == "should_stop" and stopped["step"] == 2 and not stopped["finished"]
    assert find_checkpoint(tmp_path / "run").name == "step_00000002"  # saved although save_every is 100
    resumed = Trainer(config).train()
    assert resumed["finished"] and losses(tmp_path / "run") == losses(tmp_path / "straight")
    assert resumed["loss"] == straight["loss"]


class Draws:
    """A stateful part, as a GRPO rollout RNG would be: a generator and a counter, with tensors in its state."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(1234)
        self.count = 0
        self.seen: list[float] = []

    def draw(self) -> float:
        self.count += 1
        value = torch.rand((), generator=self.generator).item()
        self.seen.append(value)
        return value

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.count = int(state["count"])


class Masking:
    """The training loader with the labels of even token ids ignored (about half of them)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # seq_len, stage, state_dict, load_state_dict, skip, set_stage, close
        return getattr(self.loader, name)

    def next_batch(self) -> dict:
        batch = self.loader.next_batch()
        return {**batch, "labels": torch.where(batch["labels"] % 2 == 0, -100, batch["labels"])}


class DrawingObjective(PretrainObjective):
    """Pretraining on half-masked labels with a random draw per micro-batch that changes nothing but
    must continue exactly across a resume."""

    name = "drawing"

    def __init__(self, inner: PretrainObjective):
        super().__init__(inner.config, Masking(inner.batches))
        self.draws = Draws()

    def loss(self, model, batch):
        self.draws.draw()
        return super().loss(model, batch)

    def stateful(self) -> dict:
        return {"draws": self.draws}


def build_drawing(config, model, ctx, run_dir):
    build_drawing.last = DrawingObjective(build_pretrain_objective(config, model, ctx, run_dir))
    return build_drawing.last


def test_a_stateful_part_round_trips_and_tokens_count_label_tokens(two_sources, tmp_path):
    from smoltrain.data.loader import build_train_loader

    summary = Trainer(tiny_pretrain_config(two_sources, tmp_path / "straight"), build_objective=build_drawing).train()
    straight = build_drawing.last.draws.seen
    assert len(straight) == 12  # 6 steps x 2 micro-batches
    loader = build_train_loader(tiny_pretrain_config(two_sources, tmp_path / "x"))
    labels = torch.cat([loader.next_batch()["labels"] for _ in range(12)])
    assert summary["tokens"] == int((labels % 2 == 1).sum()) < labels.numel()  # not global_batch_tokens x steps

    config = tiny_pretrain_config(two_sources, tmp_path / "run", save_every=3)
    first = Trainer(config, build_objective=build_drawing, should_stop=lambda: first.state.step >= 4)
    first.train()
    assert find_checkpoint(tmp_path / "run").name == "step_00000004"
    assert build_drawing.last.draws.seen == straight[:8]
    again = Trainer(config, build_objective=build_drawing)
    assert again.objective.draws.count == 8  # restored by name from the checkpoint
    again.train()
    assert again.objective.draws.seen == straight[8:]
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_the_save_of_a_step_comes_before_its_evaluation(two_sources, tmp_path, monkeypatch):
    """An evaluation that crashes (issue 18: a TP scoring batch) must not lose that step's checkpoint."""
    import smoltrain.eval.during_training as during_training

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(during_training, "evaluate_during_training", crash)
    config = tiny_pretrain_config(two_sources, tmp_path / "run", save_every=4, eval_every=4)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.run(config, evaluation=during_training.DuringTraining())
    checkpoint = find_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "step_00000004"


class Undescribed:
    """Pretraining behind only the contract's required parts: no describe_step."""

    name = "undescribed"

    def __init__(self, inner: PretrainObjective):
        self.inner, self.batches = inner, inner.batches

    def __getattr__(self, name):  # loss, accumulation, stateful, step_metrics, evaluate
        if name == "describe_step":
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_the_start_line_describes_a_step_in_the_objectives_own_units(two_sources, tmp_path, capsys):
    config = tiny_pretrain_config(two_sources, tmp_path / "tokens", max_steps=1)
    t = config.train
    Trainer(config).train()
    accumulation = t.global_batch_tokens // (t.micro_batch_size * config.data.seq_len)  # 64 // (2 x 16) = 2
    want = f"a step = 2 x 16 tokens x {accumulation} accumulation x 1 data-parallel = {t.global_batch_tokens} tokens |"
    assert want in capsys.readouterr().out

    def build(config, model, ctx, run_dir):
        return Undescribed(build_pretrain_objective(config, model, ctx, run_dir))

    Trainer(tiny_pretrain_config(two_sources, tmp_path / "rows", max_steps=1), build_objective=build).train()
    out = capsys.readouterr().out
    assert "smoltrain train (undescribed)" in out
    assert f"a step = {accumulation} micro-batches of at most {t.micro_batch_size} rows x 1 data-parallel |" in out
