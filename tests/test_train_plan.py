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
    result = plan(config, gpus=72, mfu=0.25, peak_tflops=800.0)
    tokens = config.train.global_batch_tokens
    expected_flops = (20000 * tokens * flops_per_token(config.model, 32768)
                      + 22000 * tokens * flops_per_token(config.model, 65536))
    assert result["total_flops"] == pytest.approx(expected_flops)
    assert result["total_tokens"] == 42000 * tokens
    assert result["wall_clock_days"] == pytest.approx(expected_flops / (72 * 800e12 * 0.25) / 86400)
    # Asking for a deadline returns the GPU count that meets it.
    days = result["wall_clock_days"]
    assert plan(config, mfu=0.25, peak_tflops=800.0, days=days * 1.0001)["gpus"] == 72
    assert plan(config, mfu=0.25, peak_tflops=800.0, days=days * 2 * 1.0001)["gpus"] == 36


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


def _launchable(config, gpus: int) -> bool:
    """By hand: a multiple of TP whose data-parallel degree divides every stage's micro-batches per step."""
    t, dp = config.train, gpus // config.parallel.tp
    seq_lens = {config.data.seq_len} | {s.seq_len for s in config.data.stages if s.seq_len}
    return gpus % config.parallel.tp == 0 and all((t.global_batch_tokens // (t.micro_batch_size * n)) % dp == 0
                                                  for n in seq_lens)


@pytest.mark.parametrize("recipe, days, needed, want", [
    # 576 sequences at micro-batch 3 = 192 micro-batches x TP 2: at most 384 GPUs, whatever the deadline.
    ("smollm3-3b/pretrain.yaml", 7, 1258, 384),
    # 72 sequences of 32k then 36 of 64k at micro-batch 1, TP 2: 23 GPUs -> 24 (12 x 2; 12 divides 36).
    ("smollm3-3b/long-context.yaml", 7, 23, 24),
    # 512 sequences at micro-batch 8 = 64 micro-batches: 12 -> 16.
    ("smollm2-135m.yaml", 7, 12, 16),
])
def test_deadline_plans_round_to_a_launchable_layout_and_say_why(recipe, days, needed, want):
    config = load_config(RECIPES / recipe)
    result = plan(config, days=days)
    assert result["gpus_needed"] == needed and result["gpus"] == want
    assert _launchable(config, want) and all(not _launchable(config, g) for g in range(needed, want))
    assert result["layout"]["dp_shard"] * result["layout"]["tp"] == want
    assert str(needed) in result["note"].replace(",", "") and "micro-batch" in result["note"]
    if want < needed:  # capped: the deadline is missed, and the plan says by how much
        assert result["wall_clock_days"] > days


def test_gpus_that_cannot_launch_are_refused_with_the_nearest_counts(capsys):
    pretrain = str(RECIPES / "smollm3-3b" / "pretrain.yaml")
    assert cli_main(["plan", pretrain, "--gpus", "7"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 7 cannot launch" in err and "nearest: 6 or 8" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["plan", str(RECIPES / "smollm2-135m.yaml"), "--gpus", "12"]) == 2
    assert "nearest: 8 or 16" in capsys.readouterr().err
    # Without --gpus a TP 2 recipe is timed on its smallest layout, 2 GPUs, not on 1.
    assert plan(load_config(pretrain))["gpus"] == 2


def test_gpus_and_days_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", str(RECIPES / "demo.yaml"), "--gpus", "2", "--days", "1"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
