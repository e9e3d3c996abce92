"""Hugging Face interop against transformers itself: logit parity per family, bit-exact round trips,
tokenizer files AutoTokenizer can load, and one-line errors for what we cannot read."""

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from smoltrain import cli
from smoltrain.config import Config, ModelConfig
from smoltrain.errors import CheckpointError
from smoltrain.model.transformer import build_model
from smoltrain.report.hf_export import export_hf
from smoltrain.train.load_model import import_hf, load_any, load_model_folder, save_model_folder

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, max_seq_len=64, rope_theta=5000.0)

# (expected transformers class, our switches): GQA ratios, tied/untied, NoPE intervals, QK-norm.
SHAPES = [
    ("LlamaForCausalLM", dict(num_layers=2, num_heads=8, num_kv_heads=2, tie_embeddings=True)),
    ("LlamaForCausalLM", dict(num_layers=3, num_heads=4, num_kv_heads=4, tie_embeddings=False)),
    ("LlamaForCausalLM", dict(num_layers=2, num_heads=4, num_kv_heads=1, tie_embeddings=True, norm_eps=1e-5)),
    ("SmolLM3ForCausalLM", dict(num_layers=4, num_heads=4, num_kv_heads=2, nope_every=4, tie_embeddings=True)),
    ("SmolLM3ForCausalLM", dict(num_layers=5, num_heads=8, num_kv_heads=4, nope_every=2, tie_embeddings=False)),
    ("SmolLM3ForCausalLM", dict(num_layers=2, num_heads=4, num_kv_heads=2, position_encoding="none")),
    # RoPE everywhere but hidden_size % num_heads != 0: LlamaConfig refuses that, SmolLM3 computes it.
    ("SmolLM3ForCausalLM", dict(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16)),
    ("Qwen3ForCausalLM", dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24, qk_norm=True, tie_embeddings=True)),
    ("Qwen3ForCausalLM", dict(num_layers=3, num_heads=8, num_kv_heads=1, qk_norm=True, tie_embeddings=False)),
]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm weights away from 1 too, so a misnamed norm cannot hide behind its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("architecture,shape", SHAPES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(SHAPES)])
def test_exported_folder_logits_match_transformers(tmp_path, architecture, shape):
    model = build_model(ModelConfig(**BASE, **shape), seed=3)
    _randomise(model, 3)
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids), hf(input_ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def _hf_models():
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=20000.0)),
        # No no_rope_layers list: the pattern comes from no_rope_layer_interval, as in SmolLM3's own config.
        "smollm3": lambda: SmolLM3ForCausalLM(SmolLM3Config(**common, num_hidden_layers=6, no_rope_layer_interval=3)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)),
    }


@pytest.mark.parametrize("family", ["llama", "smollm3", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_then_export_of_transformers_model_is_bit_identical(tmp_path, family, dtype):
    torch.manual_seed(0)
    hf = _hf_models()[family]().to(dtype)
    hf.save_pretrained(tmp_path / "original")
    import_hf(tmp_path / "original", tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "exported")
    before = load_file(tmp_path / "original" / "model.safetensors")
    after = load_file(tmp_path / "exported" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name
    original, exported = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("original", "exported"))
    assert exported["architectures"] == original["architectures"]


@pytest.mark.parametrize("family", ["llama", "smollm3", "qwen3"])
def test_imported_model_logits_match_the_transformers_original(tmp_path, family):
    torch.manual_seed(1)
    hf = _hf_models()[family]().eval()
    _randomise(hf, 1)
    hf.save_pretrained(tmp_path / "original")
    import_hf(tmp_path / "original", tmp_path / "ours")
    model, config = load_model_folder(tmp_path / "ours")
    input_ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids) - hf(input_ids).logits).abs().max().item() <= 1e-4
    if family == "smollm3":  # interval 3 in HF -> NoPE in every 3rd layer here
        assert config.model.nope_every == 3


def test_published_style_config_with_top_level_rope_theta_is_read(tmp_path):
    """Checkpoints saved before transformers 5 carry rope_theta and rope_scaling at the top level."""
    torch.manual_seed(2)
    hf = _hf_models()["llama"]().eval()
    hf.save_pretrained(tmp_path / "original")
    path = tmp_path / "original" / "config.json"
    raw = json.loads(path.read_text())
    raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
    raw["rope_scaling"] = None
    path.write_text(json.dumps(raw))
    model, config, _ = load_any(tmp_path / "original")
    assert config.model.rope_theta == 20000.0
    input_ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids) - hf(input_ids).logits).abs().max().item() <= 1e-4


def _tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path))
    return tok


def test_export_writes_tokenizer_that_autotokenizer_loads(tmp_path):
    tok = _tokenizer_json(tmp_path / "tokenizer.json")
    model = build_model(ModelConfig(**BASE, num_layers=1, num_heads=4, num_kv_heads=2), seed=0)
    export_hf(model, tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "the lazy fox"
    assert loaded(text)["input_ids"] == tok.encode(text).ids
    endoftext = tok.token_to_id("<|endoftext|>")
    assert loaded.eos_token_id == endoftext
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == endoftext


def test_import_copies_tokenizer_and_load_any_finds_it(tmp_path):
    (tmp_path / "original").mkdir()
    _tokenizer_json(tmp_path / "original" / "tokenizer.json")
    hf = _hf_models()["llama"]()
    hf.save_pretrained(tmp_path / "original")
    (tmp_path / "original" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": "{{ messages }}"}))
    import_hf(tmp_path / "original", tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    _, _, tokenizer = load_any(tmp_path / "ours")
    assert tokenizer is not None and (tmp_path / "ours" / "tokenizer.json").samefile(f"{tokenizer}/tokenizer.json")
    export_hf(tmp_path / "ours", tmp_path / "exported")
    # eos named by the copied tokenizer_config.json, not guessed
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["eos_token_id"] == 2


def test_model_folder_round_trip_keeps_weights_config_and_abf_theta(tmp_path):
    config = Config(model=ModelConfig(**BASE, num_layers=2, num_heads=4, num_kv_heads=2, nope_every=2))
    config.data.seq_len = 64
    config.train.global_batch_tokens = 512
    model = build_model(config.model, seed=5)
    model.set_rope(theta=80000.0)  # a long-context stage changed the RoPE base
    save_model_folder(model, config, tmp_path / "folder")
    loaded, loaded_config = load_model_folder(tmp_path / "folder")
    assert loaded_config.model.rope_theta == 80000.0
    assert loaded_config.train == config.train and loaded_config.data.seq_len == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    input_ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert torch.equal(model(input_ids), loaded(input_ids))


def test_load_any_hands_run_folders_to_the_trainers_checkpoint_loader(tmp_path, monkeypatch):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010\n")
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")  # a run folder has one too, but no weights
    model_config = ModelConfig(**BASE, num_layers=1, num_heads=4, num_kv_heads=2)
    seen = []

    def load_model_from_checkpoint(path, device):
        seen.append(path)
        return build_model(model_config, seed=0), Config(model=model_config)

    fake = types.ModuleType("smoltrain.train.checkpoint")
    fake.load_model_from_checkpoint = load_model_from_checkpoint
    monkeypatch.setitem(sys.modules, "smoltrain.train.checkpoint", fake)
    model, config, tokenizer = load_any(tmp_path / "run")
    assert seen == [str(tmp_path / "run")] and tokenizer is None
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / ".metadata").write_bytes(b"")
    load_any(tmp_path / "step")
    assert seen[-1] == str(tmp_path / "step")


def test_unsupported_architecture_error_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "vocab_size": 10}))
    with pytest.raises(CheckpointError) as error:
        import_hf(tmp_path, tmp_path / "out")
    message = str(error.value)
    assert "MistralForCausalLM" in message
    assert all(name in message for name in ("LlamaForCausalLM", "SmolLM3ForCausalLM", "Qwen3ForCausalLM"))
    assert not (tmp_path / "out").exists()


def test_qk_norm_with_nope_layers_cannot_be_exported(tmp_path):
    model = build_model(ModelConfig(**BASE, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True, nope_every=2), seed=0)
    with pytest.raises(CheckpointError, match="QK-norm"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_rope_scaling_is_refused_with_the_key_named(tmp_path):
    hf = _hf_models()["llama"]()
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="llama3"):
        import_hf(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("argv", [
    ["import", "{tmp}/missing", "--out", "{tmp}/out"],
    ["export", "{tmp}/missing", "--out", "{tmp}/out"],
    ["export", "{tmp}", "--out", "{tmp}/out"],  # exists, but is no model of any kind
    ["import", "{tmp}/bad", "--out", "{tmp}/out"],  # config.json that is not JSON
])
def test_bad_paths_give_one_line_error_and_exit_code_2(tmp_path, capsys, argv):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    code = cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"smoltrain {argv[0]}: error:")
    assert "Traceback" not in err


def test_cli_export_then_import_round_trip(tmp_path, capsys):
    config = Config(model=ModelConfig(**BASE, num_layers=2, num_heads=4, num_kv_heads=2))
    config.data.seq_len = 64
    config.train.global_batch_tokens = 512
    model = build_model(config.model, seed=0)
    save_model_folder(model, config, tmp_path / "folder")
    assert cli.main(["export", str(tmp_path / "folder"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert cli.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model_folder(tmp_path / "back")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name


def test_export_check_compares_with_transformers_and_fails_on_a_broken_folder(tmp_path, capsys):
    """`export --check`: a faithful export passes; the same folder with one weight changed on disk fails (exit 1)."""
    from safetensors.torch import load_file, save_file

    config = Config(model=ModelConfig(**BASE, num_layers=2, num_heads=4, num_kv_heads=2))
    config.data.seq_len = 64
    model = build_model(config.model, seed=0)
    _randomise(model, 1)
    save_model_folder(model, config, tmp_path / "folder")
    assert cli.main(["export", str(tmp_path / "folder"), "--out", str(tmp_path / "hf"), "--check"]) == 0
    assert "greedy continuation identical: ok" in capsys.readouterr().out
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    name = next(n for n in state if n.endswith("mlp.down_proj.weight"))
    state[name] = state[name] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    assert cli._check_export(str(tmp_path / "folder"), tmp_path / "hf") == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_missing_tokenizer_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    model = build_model(ModelConfig(**BASE, num_layers=1, num_heads=4, num_kv_heads=2), seed=0)
    config = Config(model=model.config)
    config.data.seq_len = 64
    config.train.global_batch_tokens = 512
    save_model_folder(model, config, tmp_path / "folder")
    code = cli.main(["export", str(tmp_path / "folder"), "--out", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "nope.json")])
    assert code == 2 and "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_tokenizer_json_brings_its_companion_config_and_null_bos_stays_null(tmp_path):
    (tmp_path / "tok").mkdir()
    tok = _tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    model = build_model(ModelConfig(**BASE, num_layers=1, num_heads=4, num_kv_heads=2), seed=0)
    export_hf(model, tmp_path / "hf", tokenizer=tmp_path / "tok" / "tokenizer.json")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    endoftext = tok.token_to_id("<|endoftext|>")
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (None, endoftext, endoftext)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert loaded.bos_token is None and loaded.pad_token_id == endoftext
