"""Schedules against their formulas at the boundaries, and AdamW's no-decay groups by behaviour."""

import math

import pytest
import torch
import torch.nn as nn

from smoltrain.config import ModelConfig, OptimConfig, StageConfig, config_from_dict
from smoltrain.model.transformer import build_model
from smoltrain.train.optim import build_optimizer, lr_at, lr_for_step, param_groups


def test_warmup_is_linear_and_reaches_the_peak_on_its_last_step():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="constant")
    assert lr_at(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 4, 100) == pytest.approx(0.5)
    assert lr_at(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 10, 100) == 1.0
    assert lr_at(cfg, 99, 100) == 1.0


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(shape):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_shape=shape)
    total = 100  # decay over steps 80..99

    def expected(step):
        progress = (step - 80) / 20
        return 0.1 + 0.9 * (1 - (progress if shape == "linear" else math.sqrt(progress)))

    assert lr_at(cfg, 10, total) == 1.0
    assert lr_at(cfg, 79, total) == 1.0
    assert lr_at(cfg, 80, total) == pytest.approx(1.0)  # the first decay step still uses the peak
    for step in (85, 90, 99):
        assert lr_at(cfg, step, total) == pytest.approx(expected(step))
    assert lr_at(cfg, 100, total) == pytest.approx(0.1)  # reaches min_lr where the run ends
    # Monotone non-increasing after warmup.
    values = [lr_at(cfg, s, total) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_goes_from_the_peak_to_min_lr():
    cfg = OptimConfig(lr=2.0, min_lr=0.2, warmup_steps=10, schedule="cosine")
    assert lr_at(cfg, 10, 110) == pytest.approx(2.0)
    assert lr_at(cfg, 60, 110) == pytest.approx(1.1)  # half way: (peak + min) / 2
    assert lr_at(cfg, 35, 110) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 110, 110) == pytest.approx(0.2)


def test_stage_with_reset_schedule_starts_a_fresh_warmup_at_its_own_peak():
    config = config_from_dict({
        "optim": {"lr": 1.0, "warmup_steps": 4, "schedule": "wsd", "decay_fraction": 0.5},
        "data": {"seq_len": 8, "stages": [{"name": "long", "start_step": 20, "reset_schedule": True, "lr": 0.5}]},
        "model": {"max_seq_len": 8},
        "train": {"max_steps": 40, "global_batch_tokens": 64, "micro_batch_size": 8},
    })
    # First schedule spans steps 0..19 (decay over its last 10), the second 20..39 at peak 0.5.
    assert lr_for_step(config, 3) == pytest.approx(1.0)
    assert lr_for_step(config, 15) == pytest.approx(lr_at(config.optim, 15, 20))
    assert lr_for_step(config, 15) < 1.0
    assert lr_for_step(config, 20) == pytest.approx(0.5 / 4)
    assert lr_for_step(config, 23) == pytest.approx(0.5)
    assert lr_for_step(config, 39) == pytest.approx(lr_at(config.optim, 19, 20, peak_lr=0.5))
    # A stage without reset_schedule does not touch the schedule.
    config.data.stages = [StageConfig(name="mix", start_step=20)]
    assert lr_for_step(config, 20) == pytest.approx(lr_at(config.optim, 20, 40))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.LayerNorm(4)


@pytest.mark.parametrize("no_decay_embeddings", [True, False])
def test_weight_decay_skips_norms_biases_and_embeddings(no_decay_embeddings):
    model = _Tiny()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, no_decay_embeddings=no_decay_embeddings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decoupled weight decay moves weights
    optimizer.step()
    decayed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {"proj.weight"} | (set() if no_decay_embeddings else {"embed.weight"})
    assert decayed == expected
    for name in decayed:  # AdamW: p <- p x (1 - lr x wd)
        torch.testing.assert_close(dict(model.named_parameters())[name], before[name] * (1 - 0.1 * 0.5))


def test_transformer_groups_put_the_tied_embedding_and_norms_in_no_decay():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_seq_len=16, qk_norm=True)
    model = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(OptimConfig(), model)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim < 2} | {"embed_tokens.weight"}
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == OptimConfig().weight_decay
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
