"""MoE models in the Trainer: router metrics in metrics.jsonl, the loss-free bias equal to the sign
rule replayed from the logged loads, and a resumed run continuing the uninterrupted curve."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from pretrain_helpers import tiny_pretrain_config, write_two_sources

from smoltrain.config import replace_sections
from smoltrain.report.run import report_run
from smoltrain.train.checkpoint import load_model_from_checkpoint
from smoltrain.train.trainer import run

MOE = dict(num_experts=4, experts_per_token=2, expert_hidden=16, qk_norm=True, bias_update_rate=0.01, router_z_loss=1e-3)


def _config(tmp_path, out, **train):
    data = tmp_path / "data"
    config = tiny_pretrain_config(data if data.is_dir() else write_two_sources(data), tmp_path / out, **train)
    return replace_sections(config, model=dataclasses.replace(config.model, **MOE))


def _lines(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_router_metrics_and_bias_follow_the_logged_loads(tmp_path):
    config = _config(tmp_path, "run", save_every=6)
    run(config)
    steps = [m for m in _lines(tmp_path / "run") if "loss" in m and "event" not in m]
    assert len(steps) == 6
    for m in steps:
        assert {"moe_aux", "moe_z", "moe_entropy", "moe_max_load", "moe_min_load"} <= set(m)
        load = torch.tensor(m["moe_load"])
        assert load.shape == (2, 4)
        torch.testing.assert_close(load.sum(-1), torch.ones(2))
    # Replay DeepSeek-V3's rule from the logged loads (a share below 1/E raises the bias).
    expected = torch.zeros(2, 4)
    for m in steps:
        delta = 0.01 * torch.sign(0.25 - torch.tensor(m["moe_load"]))
        expected += delta - delta.mean(-1, keepdim=True)
    model, _ = load_model_from_checkpoint(str(tmp_path / "run"))
    saved = torch.stack([layer.expert_bias for layer in model.moe_layers()])
    torch.testing.assert_close(saved, expected)
    assert saved.abs().sum() > 0
    # The report draws the layer x expert load over steps.
    markdown, _ = report_run(tmp_path / "run")
    assert "expert_load.png" in Path(markdown).read_text()
    assert (tmp_path / "run" / "report" / "expert_load.png").stat().st_size > 1000


def test_a_resumed_moe_run_continues_the_same_curve(tmp_path):
    run(_config(tmp_path, "whole"))
    run(_config(tmp_path, "split", max_steps=3, save_every=3))
    run(_config(tmp_path, "split"))
    whole = [(m["step"], m["loss"]) for m in _lines(tmp_path / "whole") if "loss" in m and "event" not in m]
    split = {m["step"]: m["loss"] for m in _lines(tmp_path / "split") if "loss" in m and "event" not in m}
    assert [(s, split[s]) for s, _ in whole] == whole


@pytest.mark.slow
def test_the_dense_vs_moe_ablation_runs_at_a_tiny_size(tmp_path):
    import yaml

    from smoltrain.ablate.grid import ablate
    from smoltrain.ablate.spec import load_ablation
    from smoltrain.model.flops import parameter_counts

    path = Path(__file__).resolve().parents[1] / "recipes" / "ablations" / "dense-vs-moe.yaml"
    shipped = load_ablation(path)
    counts = {v: parameter_counts(shipped.config_for(v, 0).model) for v in shipped.variants}
    # The shipped arms keep their promise: equal active parameters (but the routers), equal total ones.
    routers = 4 * 8 * 128
    assert counts["moe-equal-active"]["active"] == counts["baseline"]["active"] + routers
    assert counts["moe-equal-total"]["total"] == counts["baseline"]["total"] + routers

    tiny = _config(tmp_path, "unused").to_dict()
    tiny["model"].update(num_experts=0, qk_norm=False, bias_update_rate=0.0, router_z_loss=0.0, intermediate_size=96)
    tiny["train"] = {k: v for k, v in tiny["train"].items() if k not in ("out_dir", "max_steps", "seed")}
    raw = {**yaml.safe_load(path.read_text()), "baseline": tiny, "budget": {"steps": 4}, "eval": {"val_batches": 0}}
    spec = load_ablation(raw=raw, out_dir=str(tmp_path / "ablation"))
    results = ablate(spec=spec)
    assert set(results["arms"]) == {"baseline", "moe-equal-active", "moe-equal-total"}
    tokens = {r["tokens"] for arm in results["arms"].values() for r in arm["runs"]}
    assert tokens == {4 * 64}  # same tokens in every run
    figures = tmp_path / "ablation" / "figures"
    assert (figures / "loss_vs_tokens.png").is_file() and (figures / "loss_vs_seconds.png").is_file()
