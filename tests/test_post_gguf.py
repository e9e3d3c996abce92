"""`smoltrain import F.gguf`: a llama.cpp file written here from one of our models comes back with the
same logits and its own chat template (the registry's SmolLM2-135M Q4_1 file is read the same way)."""

import json

import pytest
import torch

from smoltrain import cli
from smoltrain.config import ModelConfig
from smoltrain.data.tokenizer import train_tokenizer
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.template import CHATML, load_chat_tokenizer
from smoltrain.train.load_model import load_any

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to q/k rows (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok, config):
    spec = json.loads(tok.to_str())
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [None] * tok.get_vocab_size()
    for text, i in {**spec["model"]["vocab"], **added}.items():
        tokens[i] = text
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(added["<|endoftext|>"])
    w.add_eos_token_id(added["<|im_end|>"])
    w.add_chat_template(CHATML)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["embed_tokens.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[f"layers.{i}.self_attn.q_proj.weight"], config.num_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[f"layers.{i}.self_attn.k_proj.weight"], config.num_kv_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", sd[f"layers.{i}.{ours}.weight"])
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_keeps_logits_and_the_files_chat_template(tmp_path, capsys, one_thread):
    config = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                         max_seq_len=128, norm_eps=1e-5)
    model = build_model(config, seed=0)
    tok = train_tokenizer(["hello world, the quick brown fox"] * 20, 300, show_progress=False)
    write_gguf(tmp_path / "tiny.gguf", model, tok, config)
    assert cli.main(["import", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "ours")]) == 0
    imported, _, tokenizer = load_any(tmp_path / "ours")
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(imported(x), model(x), atol=1e-4, rtol=0)
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == CHATML
    chat = load_chat_tokenizer(tokenizer)
    assert chat.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "<|im_start|>user\nhello<|im_end|>\n"


def test_a_missing_or_unreadable_gguf_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["import", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    assert cli.main(["import", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "none.gguf: no such GGUF file" in err[0] and "bad.gguf" in err[1]
