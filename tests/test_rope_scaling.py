"""RoPE scaling (YaRN, linear) against transformers itself: inverse frequencies bit for bit, logits far
beyond the original window and training losses for Llama, SmolLM3 and Qwen3, and a stage switching it."""

import json
import math

import pytest
import torch
from hf_training_parity import assert_training_matches_transformers
from pretrain_helpers import tiny_pretrain_config
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)
from transformers.modeling_rope_utils import _compute_linear_scaling_rope_parameters, _compute_yarn_parameters

import smoltrain.train.trainer as trainer
from smoltrain.config import Config, DataConfig, ModelConfig, RopeScaling, StageConfig, config_from_dict, validate_model
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model.attention import rotary_tables, scaled_inverse_frequencies
from smoltrain.model.hf import from_hf_config, to_hf_config
from smoltrain.model.transformer import build_model
from smoltrain.report.hf_export import export_hf
from smoltrain.train.checkpoint import load_model_from_checkpoint
from smoltrain.train.init_model import resolve_init_model
from smoltrain.train.load_model import import_hf, load_any, save_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# (head_dim, theta, factor, original window, beta_fast, beta_slow, truncate, attention_factor)
YARN_CASES = [
    (128, 5e6, 2.0, 65536, None, None, True, None),  # SmolLM3-3B's 128k setting
    (128, 1e6, 4.0, 32768, None, None, True, None),  # Qwen3's
    (64, 10000.0, 8.0, 4096, 16, 2, False, None),
    (16, 5000.0, 4.0, 32, None, None, True, 1.25),
]


def _hf_rope_config(head_dim, theta, params, max_position=None):
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_position or params.get("original_max_position_embeddings", 64) * 4,
                       rope_parameters={"rope_theta": theta, **params})


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_frequencies_and_attention_factor_equal_transformers_bit_for_bit(case):
    head_dim, theta, factor, original, beta_fast, beta_slow, truncate, attention_factor = case
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, "truncate": truncate,
              **({"beta_fast": beta_fast, "beta_slow": beta_slow} if beta_fast else {}),
              **({"attention_factor": attention_factor} if attention_factor else {})}
    theirs, their_factor = _compute_yarn_parameters(_hf_rope_config(head_dim, theta, params))
    scaling = RopeScaling(rope_type="yarn", factor=factor, original_max_seq_len=original, truncate=truncate,
                          beta_fast=beta_fast or 32.0, beta_slow=beta_slow or 1.0, attention_factor=attention_factor)
    ours, our_factor = scaled_inverse_frequencies(head_dim, theta, scaling)
    assert torch.equal(ours, theirs)
    assert our_factor == their_factor
    # The paper's temperature, by hand: sqrt(1/t) = 0.1 ln(s) + 1.
    assert our_factor == (attention_factor or 0.1 * math.log(factor) + 1)


def test_yarn_leaves_fast_pairs_alone_and_divides_slow_ones_by_the_factor():
    # SmolLM3 at 128k (research notes): pairs below floor(24.01) = 24 extrapolate, above ceil(38.39) = 39 interpolate.
    scaling = RopeScaling(factor=2.0, original_max_seq_len=65536)
    plain, _ = scaled_inverse_frequencies(128, 5e6, None)
    yarn, factor = scaled_inverse_frequencies(128, 5e6, scaling)
    assert torch.equal(yarn[:24], plain[:24])
    torch.testing.assert_close(yarn[39:], plain[39:] / 2)
    assert factor == pytest.approx(1.0693147, abs=1e-7)
    assert torch.equal(scaled_inverse_frequencies(128, 5e6, RopeScaling(rope_type="default"))[0], plain)


def test_linear_scaling_equals_transformers_and_only_divides_the_frequencies():
    config = _hf_rope_config(32, 10000.0, {"rope_type": "linear", "factor": 4.0}, max_position=256)
    theirs, _ = _compute_linear_scaling_rope_parameters(config)
    ours, factor = scaled_inverse_frequencies(32, 10000.0, RopeScaling(rope_type="linear", factor=4.0))
    assert torch.equal(ours, theirs) and factor == 1.0
    cos, _ = rotary_tables(32, 9, 10000.0, scaling=RopeScaling(rope_type="linear", factor=4.0))
    plain_cos, _ = rotary_tables(32, 3, 10000.0)
    torch.testing.assert_close(cos[8], plain_cos[2], rtol=0, atol=1e-6)  # position 8 at a quarter speed is position 2


BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, rope_theta=5000.0)
# Trained (originally) at 32 tokens, stretched 4x: positions up to 120 sit far outside the original window.
YARN = RopeScaling(rope_type="yarn", factor=4.0, original_max_seq_len=32)
FAMILIES = [
    ("LlamaForCausalLM", dict(num_layers=2, num_heads=4, num_kv_heads=2, tie_embeddings=False)),
    ("SmolLM3ForCausalLM", dict(num_layers=4, num_heads=4, num_kv_heads=2, nope_every=2)),
    ("Qwen3ForCausalLM", dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24, qk_norm=True)),
]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("scaling", [YARN, RopeScaling(rope_type="linear", factor=4.0)], ids=["yarn", "linear"])
@pytest.mark.parametrize("architecture,shape", FAMILIES, ids=[a for a, _ in FAMILIES])
def test_exported_scaled_model_logits_match_transformers_beyond_the_original_window(tmp_path, architecture, shape, scaling):
    model = build_model(ModelConfig(**BASE, **shape, max_seq_len=128, rope_scaling=scaling), seed=3)
    _randomise(model, 3)
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    assert hf.config.rope_parameters["rope_type"] == scaling.rope_type
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids), hf(input_ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # The scaling is not a no-op at these positions: default RoPE gives other logits.
    model.set_rope(scaling=None)
    with torch.no_grad():
        assert (model(input_ids) - theirs).abs().max().item() > 1e-3


def _hf_yarn_model(family: str):
    """A transformers model with YaRN (legacy `rope_scaling` form for Llama, v5 `rope_parameters` for the others)."""
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=128, pad_token_id=None, bos_token_id=0, eos_token_id=1)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32}))
    if family == "smollm3":
        return SmolLM3ForCausalLM(SmolLM3Config(**common, no_rope_layer_interval=2, rope_parameters=yarn))
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, rope_parameters={**yarn, "beta_fast": 16.0}))


@pytest.mark.parametrize("family", ["llama", "smollm3", "qwen3"])
def test_continued_pretraining_with_yarn_gives_transformers_losses(tmp_path, family):
    hf = _hf_yarn_model(family).train()
    hf.save_pretrained(tmp_path / "hf")
    ours, config, _ = load_any(import_hf(tmp_path / "hf", tmp_path / "ours"))
    assert config.model.rope_scaling.rope_type == "yarn" and config.model.rope_scaling.original_max_seq_len == 32
    assert_training_matches_transformers(hf, ours, steps=4, seq_len=100, rel=1e-5)


def test_rope_parameters_round_trip_and_other_scalings_are_refused():
    m = ModelConfig(**BASE, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
                    rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=32, beta_fast=16.0, attention_factor=1.1))
    assert from_hf_config(to_hf_config(m)) == m
    hf = to_hf_config(m)
    for rope_type in ("llama3", "longrope", "dynamic"):
        with pytest.raises(CheckpointError, match=rope_type):
            from_hf_config({**hf, "rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ConfigError, match="original_max_seq_len"):
        validate_model(ModelConfig(rope_scaling=RopeScaling(factor=2.0)))


def test_a_stage_switches_yarn_on_and_the_checkpoint_keeps_it(two_sources, tmp_path):
    config = tiny_pretrain_config(two_sources, tmp_path / "run", max_steps=4)
    config.data.stages = [StageConfig(name="long", start_step=2, seq_len=32,
                                      rope_scaling=RopeScaling(factor=2.0, original_max_seq_len=16))]
    trainer.run(config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["rope_scaling"]["rope_type"] for line in lines if line.get("event") == "stage"] == ["yarn"]
    model, saved = load_model_from_checkpoint(tmp_path / "run")
    assert saved.model.rope_scaling == RopeScaling(factor=2.0, original_max_seq_len=16)
    expected_cos, _ = rotary_tables(8, 64, 10000.0, scaling=saved.model.rope_scaling)
    assert torch.equal(model.rope_cos[:64], expected_cos)


def test_continued_pretraining_from_an_init_model_may_switch_yarn_on(tmp_path):
    shape = ModelConfig(**BASE, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    init = save_model_folder(build_model(shape, seed=0), Config(model=shape, data=DataConfig(seq_len=64)), tmp_path / "init")
    config = config_from_dict({"model": {"max_seq_len": 256, "rope_scaling": {"factor": 4, "original_max_seq_len": 64}},
                               "data": {"seq_len": 256}, "train": {"init": str(init)}})
    said = []
    resolved = resolve_init_model(config, said.append)
    assert resolved.model.rope_scaling == RopeScaling(factor=4.0, original_max_seq_len=64)
    assert resolved.model.hidden_size == shape.hidden_size and "model.rope_scaling" in said[0]
