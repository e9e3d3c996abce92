"""Every recipe validates, its shapes match what transformers builds for the published configs, and
the SmolLM3 stages, schedule and token budgets are the published ones. The demo recipe trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoltrain.config import load_config
from smoltrain.train.optim import lr_for_step
from smoltrain.train.plan import stage_segments

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TRAINING_RECIPES = sorted(RECIPES.glob("*.yaml")) + sorted((RECIPES / "smollm3-3b").glob("*.yaml"))


def test_the_recipes_this_issue_promises_exist():
    names = {str(p.relative_to(RECIPES)) for p in TRAINING_RECIPES}
    assert {"demo.yaml", "smollm2-135m.yaml", "smollm3-3b/pretrain.yaml", "smollm3-3b/long-context.yaml"} <= names


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path):
    config = load_config(path)
    for stage in config.data.stages:
        assert sum(stage.mixture.values()) == pytest.approx(1.0, abs=0.01)


def _transformers_parameters(hf_config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def test_smollm2_135m_recipe_is_the_published_shape():
    from transformers import LlamaConfig

    from smoltrain.model.flops import parameter_counts

    m = load_config(RECIPES / "smollm2-135m.yaml").model
    # HuggingFaceTB/SmolLM2-135M's config.json (shape fields).
    hf = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    assert parameter_counts(m)["total"] == _transformers_parameters(hf) == 134_515_008


def test_smollm3_recipes_are_the_published_shape():
    from transformers import SmolLM3Config

    from smoltrain.model.flops import parameter_counts

    for name in ("pretrain.yaml", "long-context.yaml"):
        m = load_config(RECIPES / "smollm3-3b" / name).model
        hf = SmolLM3Config(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                           no_rope_layer_interval=4, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        assert parameter_counts(m)["total"] == _transformers_parameters(hf)  # 3.08B
        assert [m.uses_rope(i) for i in range(36)] == [bool(x) for x in hf.no_rope_layers]


def test_smollm3_pretraining_stages_schedule_and_budget():
    config = load_config(RECIPES / "smollm3-3b" / "pretrain.yaml")
    tokens_per_step = config.train.global_batch_tokens
    assert tokens_per_step == 576 * 4096  # ~2.36M
    segments = stage_segments(config)
    assert [s["name"] for s in segments] == ["stable-web", "stable-math-code", "decay"]
    boundaries = [s["start_step"] * tokens_per_step / 1e12 for s in segments[1:]]
    assert boundaries == pytest.approx([8.14, 9.90], abs=0.01)  # trillions of tokens
    assert config.train.max_steps * tokens_per_step / 1e12 == pytest.approx(11.14, abs=0.01)
    # WSD: 2000 warmup steps, the peak until the decay stage begins, linear to 0 at the end.
    assert lr_for_step(config, 1999) == pytest.approx(2e-4)
    assert lr_for_step(config, 4_197_999) == 2e-4
    assert lr_for_step(config, 4_198_000 + 261_000) == pytest.approx(1e-4)
    assert lr_for_step(config, config.train.max_steps - 1) < 1e-9
    web_share = [s.mixture["web"] + s.mixture["multilingual"] for s in config.data.stages]
    assert web_share[0] > web_share[1] > web_share[2]  # each stage shifts weight to code and math


def test_smollm3_long_context_stages():
    config = load_config(RECIPES / "smollm3-3b" / "long-context.yaml")
    segments = stage_segments(config)
    assert [(s["seq_len"], s["steps"]) for s in segments] == [(32768, 20000), (65536, 22000)]
    assert [s.rope_theta for s in config.data.stages] == [2e6, 5e6]
    for s in segments:  # ~50B tokens each
        assert 45e9 < s["steps"] * config.train.global_batch_tokens < 55e9
    # A fresh schedule per stage: warmup from ~0 again at step 20000 to the 2e-5 peak.
    assert lr_for_step(config, 19_999) < 1e-9
    assert lr_for_step(config, 20_000) == pytest.approx(2e-5 / 1000)
    assert lr_for_step(config, 20_999) == pytest.approx(2e-5)
    assert config.train.init  # starts from the pretraining run


@pytest.mark.slow
def test_demo_recipe_trains_on_a_fresh_cache(tmp_path):
    """`smoltrain train recipes/demo.yaml` with nothing built first (a small share of the corpus)."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "smoltrain", "train", str(RECIPES / "demo.yaml"),
         "--set", f"train.out_dir={run}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--set", "data.embedded_fraction=0.03", "--set", "train.max_steps=4", "--set", "train.log_every=1",
         "--set", "train.eval_every=4", "--set", "eval.val_batches=1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m and "event" not in m]
    assert len(losses) == 4 and losses[-1] < losses[0] < 9.0  # ln(4096) = 8.3 at initialisation
    assert any("eval" in m for m in lines)
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
