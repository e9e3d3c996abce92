"""A model to start from defines the model (issue 11, item 7): with train.init and no model section the
run takes the init model's config (a Hugging Face config.json or a model folder's config.yaml), not
the defaults; a contradicting explicit value is a one-line error naming both; keys a later stage may
change are kept and reported; the trainer trains the imported weights with their own RoPE base."""

import pytest
import torch
from synthetic_shards import write_random_documents

from smoltrain.config import ModelConfig, config_from_dict
from smoltrain.errors import ConfigError
from smoltrain.model.transformer import build_model
from smoltrain.report.hf_export import export_hf
from smoltrain.train import trainer
from smoltrain.train.init_model import init_model_section, resolve_init_model
from smoltrain.train.load_model import save_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2's RoPE base and norm eps, which differ from the defaults (10000, 1e-6).
SOURCE = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
              max_seq_len=64, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    model = build_model(ModelConfig(**SOURCE), seed=3)
    export_hf(model, root / "hf")
    return root / "hf"


def config_with(init, **model):
    raw = {"model": model, "data": {"seq_len": 16}, "train": {"init": str(init), "global_batch_tokens": 64, "micro_batch_size": 2}}
    return config_from_dict(raw, base_model=init_model_section(raw))


def test_without_a_model_section_the_model_comes_from_the_hugging_face_config(hf_folder):
    config = resolve_init_model(config_with(hf_folder))
    for key, value in SOURCE.items():
        assert getattr(config.model, key) == value, key
    assert ModelConfig().rope_theta == 10000.0 and ModelConfig().norm_eps == 1e-6  # not the defaults


def test_a_contradicting_explicit_value_is_a_one_line_error_naming_both(hf_folder):
    with pytest.raises(ConfigError) as error:
        resolve_init_model(config_with(hf_folder, norm_eps=1e-6, hidden_size=64, num_heads=4, num_kv_heads=2))
    message = str(error.value)
    assert "model.norm_eps is 1e-06 here but 1e-05 in the init model" in message
    assert "model.hidden_size is 64 here but 32 in the init model" in message and "\n" not in message
    # Values that agree, or that are not given, are fine.
    assert resolve_init_model(config_with(hf_folder, norm_eps=1e-5)).model.norm_eps == 1e-5


def test_keys_a_later_stage_may_change_are_kept_and_reported(hf_folder):
    said = []
    config = resolve_init_model(config_with(hf_folder, rope_theta=2e6, max_seq_len=128), say=said.append)
    assert config.model.rope_theta == 2e6 and config.model.max_seq_len == 128 and config.model.norm_eps == 1e-5
    assert len(said) == 1 and "model.rope_theta 2000000.0 (the init model has 100000.0)" in said[0]
    assert "model.max_seq_len 128 (the init model has 64)" in said[0]


def test_the_trainer_trains_the_init_model_with_its_own_settings(hf_folder, tmp_path):
    write_random_documents(tmp_path / "data", "low", 1, 100, seed=1)
    config = config_from_dict({
        "data": {"sources": {"low": str(tmp_path / "data")}, "seq_len": 16},
        "train": {"init": str(hf_folder), "out_dir": str(tmp_path / "run"), "max_steps": 1, "log_every": 1,
                  "global_batch_tokens": 64, "micro_batch_size": 2, "tensorboard": False, "device": "cpu"},
    })
    run = trainer.Trainer(config)
    assert run.model.rope_theta == 100000.0 and run.model.config.norm_eps == 1e-5
    source = build_model(ModelConfig(**SOURCE), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), source.state_dict().values()))
    run.train()
    from smoltrain.config import load_config

    assert load_config(tmp_path / "run" / "config.yaml").model.rope_theta == 100000.0  # the resolved config


def test_a_model_folder_defines_the_model_too(tmp_path):
    source = config_from_dict({"model": SOURCE, "data": {"seq_len": 16}})
    save_model_folder(build_model(source.model, seed=1), source, tmp_path / "folder")
    assert resolve_init_model(config_with(tmp_path / "folder")).model == source.model


def test_a_partial_model_section_overrides_the_init_model_not_the_defaults(hf_folder):
    # 2 KV heads and tensor parallel 2 fit the init model (4 heads, 2 KV heads); the defaults' 9 heads
    # and 3 KV heads would refuse both before the init model was read.
    # (the loader's way: config.py reads no files, train/init_model.py hands it the init model's section)
    raw = {"model": {"num_kv_heads": 2, "max_seq_len": 128}, "data": {"seq_len": 16}, "parallel": {"tp": 2},
           "train": {"init": str(hf_folder), "global_batch_tokens": 64, "micro_batch_size": 2}}
    config = config_from_dict(raw, base_model=init_model_section(raw))
    assert config.model == ModelConfig(**{**SOURCE, "max_seq_len": 128})
    assert {k for k in config.explicit if k.startswith("model.")} == {"model.num_kv_heads", "model.max_seq_len"}
    said = []
    assert resolve_init_model(config, say=said.append).model == config.model
    assert said == [f"model from train.init {hf_folder}, changed: model.max_seq_len 128 (the init model has 64)"]
    # A shape the init model does not have is still refused, naming both.
    with pytest.raises(ConfigError, match="model.hidden_size is 64 here but 32 in the init model"):
        resolve_init_model(config_with(hf_folder, hidden_size=64))


def test_a_value_equal_to_the_default_is_kept_when_a_runner_replaces_sections(hf_folder, tmp_path):
    """max_seq_len 2048 is ModelConfig's default: an ablation run's config (its train section
    replaced for the budget) must still count it as given, not take the init model's 64."""
    from smoltrain.ablate.spec import load_ablation

    baseline = {"model": {"max_seq_len": 2048}, "data": {"seq_len": 16},
                "train": {"init": str(hf_folder), "global_batch_tokens": 64, "micro_batch_size": 2}}
    spec = load_ablation(raw={"baseline": baseline, "variants": {"short": ["model.max_seq_len=32"]}, "seeds": [0],
                              "budget": {"steps": 3}, "eval": {"tasks": [], "val_batches": 0}},
                         out_dir=str(tmp_path / "ablation"))
    assert resolve_init_model(spec.config_for("baseline", 0)).model.max_seq_len == 2048
    assert resolve_init_model(spec.config_for("short", 0)).model.max_seq_len == 32
    assert resolve_init_model(spec.config_for("short", 0)).model.norm_eps == SOURCE["norm_eps"]


def test_init_on_the_command_line_is_the_base_of_the_recipes_model_section(hf_folder, tmp_path):
    from smoltrain.cli import main as cli_main
    from smoltrain.config import load_config

    write_random_documents(tmp_path / "data", "low", 1, 100, seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{num_kv_heads: 2, max_seq_len: 128}}   # the defaults' 9 heads do not take 2 KV heads; the init model's 4 do
data: {{sources: {{low: {tmp_path / 'data'}}}, seq_len: 16}}
train: {{out_dir: {tmp_path / 'run'}, max_steps: 1, log_every: 1, global_batch_tokens: 64, micro_batch_size: 2,
        tensorboard: false, device: cpu}}
""")
    assert cli_main(["train", str(recipe), "--init", str(hf_folder)]) == 0
    assert load_config(tmp_path / "run" / "config.yaml").model == ModelConfig(**{**SOURCE, "max_seq_len": 128})
