"""Config: typed loading, overrides, validation errors that name keys, YAML round trip, CLI exit codes."""

import subprocess
import sys

import pytest
import yaml

from smoltrain.config import Config, config_from_dict, load_config, save_config
from smoltrain.errors import ConfigError


def test_overrides_are_coerced_by_annotation():
    cfg = config_from_dict({}, ["optim.lr=3e-4", "model.tie_embeddings=false", "train.max_steps=20", "model.head_dim=null"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_embeddings is False
    assert cfg.train.max_steps == 20
    assert cfg.model.head_dim is None


def test_on_and_off_stay_words_though_yaml_reads_them_as_booleans(tmp_path):
    cfg = config_from_dict({}, ["train.compile=on"])
    assert cfg.train.compile == "on"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  compile: off\n")
    assert load_config(path).train.compile == "off"
    with pytest.raises(ConfigError, match="train.precision: True is not allowed"):
        config_from_dict({}, ["train.precision=on"])  # no on/off there: still refused


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_kv_head'.*did you mean 'num_kv_heads'"):
        config_from_dict({"model": {"num_kv_head": 2}})
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        config_from_dict({"optimizer": {}})


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["model.hidden_size=100", "model.num_heads=3"], ["model.hidden_size", "model.num_heads"]),
        (["model.num_heads=8", "model.hidden_size=64", "model.num_kv_heads=3"], ["model.num_heads", "model.num_kv_heads"]),
        (["model.hidden_size=60", "model.num_heads=4", "model.num_kv_heads=2"], ["model.head_dim", "rope"]),
        (["data.seq_len=4096", "model.max_seq_len=2048"], ["data.seq_len", "model.max_seq_len"]),
        (["train.global_batch_tokens=1000"], ["train.global_batch_tokens", "train.micro_batch_size"]),
        (["parallel.tp=2", "model.num_kv_heads=3", "model.num_heads=9"], ["parallel.tp", "model.num_kv_heads"]),
        (["model.attention_kernel=triton"], ["model.attention_kernel"]),
        (["train.max_steps=ten"], ["train.max_steps"]),
    ],
)
def test_impossible_combinations_name_their_keys(overrides, keys):
    with pytest.raises(ConfigError) as error:
        config_from_dict({}, overrides)
    for key in keys:
        assert key in str(error.value)


def test_dump_and_reload_is_unchanged(tmp_path):
    cfg = config_from_dict(
        {"data": {"stages": [{"name": "s1", "start_step": 0}, {"name": "long", "start_step": 10, "seq_len": 1024, "rope_theta": 1e6}]}},
        ["model.nope_every=4", "optim.schedule=cosine"],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.data.stages[1].rope_theta == 1e6
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_defaults_are_valid():
    assert isinstance(load_config(None), Config)


def test_nope_every_follows_hf_smollm3_pattern():
    cfg = config_from_dict({}, ["model.nope_every=4", "model.num_layers=8"]).model
    assert [int(cfg.uses_rope(i)) for i in range(8)] == [1, 1, 1, 0, 1, 1, 1, 0]


def test_cli_reports_a_bad_config_in_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 64\n")
    result = subprocess.run([sys.executable, "-m", "smoltrain", "config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hidden_size" in result.stderr and str(bad) in result.stderr


def test_cli_reports_invalid_yaml_with_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  hidden_size: [64\n")
    result = subprocess.run([sys.executable, "-m", "smoltrain", "config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
