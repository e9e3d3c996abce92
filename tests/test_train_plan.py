"""`smoltrain plan` against the sizing formula, and SmolLM3's published run (384 H100s, ~24 days)."""

import json
from pathlib import Path

import pytest

from smoltrain.cli import main as cli_main
from smoltrain.config import load_config
from smoltrain.model.flops import flops_per_token
from smoltrain.train.plan import plan

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_plan_follows_the_sizing_formula():
    config = load_config(RECIPES / "smollm3-3b" / "long-context.yaml")
    result = plan(config, gpus=96, mfu=0.25, peak_tflops=800.0)
    tokens = config.train.global_batch_tokens
    expected_flops = (20000 * tokens * flops_per_token(config.model, 32768)
                      + 22000 * tokens * flops_per_token(config.model, 65536))
    assert result["total_flops"] == pytest.approx(expected_flops)
    assert result["total_tokens"] == 42000 * tokens
    assert result["wall_clock_days"] == pytest.approx(expected_flops / (96 * 800e12 * 0.25) / 86400)
    # Asking for a deadline returns the GPU count that meets it.
    days = result["wall_clock_days"]
    assert plan(config, mfu=0.25, peak_tflops=800.0, days=days * 1.0001)["gpus"] == 96
    assert plan(config, mfu=0.25, peak_tflops=800.0, days=days / 2 * 1.0001)["gpus"] == 192


def test_smollm3_pretraining_plan_matches_the_published_run():
    result = plan(load_config(RECIPES / "smollm3-3b" / "pretrain.yaml"), gpus=384)
    assert result["parameters"]["total"] == 3_075_098_624
    assert 20 < result["wall_clock_days"] < 27  # trained in ~24 days at ~30% MFU
    assert 12_000 < result["tokens_per_s_per_gpu"] < 16_000  # published 13.5k-14k tokens/s/GPU
    # FSDP over 192 x TP 2: the 3B model's states are sharded 384 ways, activations dominate.
    assert result["memory_assumes"]["num_shards"] == 384
    mem = result["memory_per_device_gb"]
    assert mem["weights"] < 0.1 and mem["activations"] > mem["optimizer"]


def test_plan_cli_prints_a_table_and_json(capsys):
    assert cli_main(["plan", str(RECIPES / "demo.yaml")]) == 0
    table = capsys.readouterr().out
    for word in ("parameters", "FLOPs per token", "memory per device", "wall clock"):
        assert word in table
    assert cli_main(["plan", str(RECIPES / "smollm2-135m.yaml"), "--json", "--days", "7"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gpus"] >= 1 and result["wall_clock_days"] <= 7
    assert cli_main(["plan", str(RECIPES / "demo.yaml"), "--mfu", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "smoltrain plan: error: --mfu must be positive and at most 1, got 1.5"
