"""`smoltrain chat` (piped stdin), `smoltrain generate` and `smoltrain eval --chat` on a tiny model folder."""

import io
import json

import pytest
from chat_helpers import VOCAB, chat_tokenizers

from smoltrain import cli
from smoltrain.config import Config, DataConfig, ModelConfig
from smoltrain.model.generate import generate
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.repl import chat_repl, load_chat_model
from smoltrain.post.chat.template import encode_prompt, end_of_turn_id
from smoltrain.train.load_model import save_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = chat_tokenizers(tmp_path_factory.mktemp("tok"))
    config = Config(model=ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      intermediate_size=64, max_seq_len=256), data=DataConfig(seq_len=256))
    save_model_folder(build_model(config.model, seed=0), config, root / "model", tokenizer=root / "smollm3")
    return root / "model"


def test_chat_repl_streams_greedy_replies_and_switches_mode_with_a_flag(model_dir, one_thread):
    model, tok = load_chat_model(model_dir)
    lines = "What is 2 + 3?\n/no_think\nAnd 4 + 4?\n/bogus\n/system Answer in capital letters only.\nHi\n"
    out = io.StringIO()
    conversation = chat_repl(model, tok, max_new_tokens=8, stdin=io.StringIO(lines), stdout=out)
    assert conversation[0] == {"role": "system", "content": "Answer in capital letters only."}
    assert [m["role"] for m in conversation] == ["system", "user", "assistant"]
    text = out.getvalue()
    assert "unknown command /bogus" in text and "conversation reset" in text
    # replay the first two turns by hand: greedy replies, the second user message carries /no_think
    eot = end_of_turn_id(tok)
    first = [{"role": "user", "content": "What is 2 + 3?"}]
    reply1 = tok.decode(generate(model, [encode_prompt(tok, first, enable_thinking=True)], 8, stop_tokens=[eot])[0])
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And 4 + 4? /no_think"}]
    prompt2 = encode_prompt(tok, second, enable_thinking=True)
    assert tok.decode(prompt2).endswith("<think>\n\n</think>\n")
    reply2 = tok.decode(generate(model, [prompt2], 8, stop_tokens=[eot])[0])
    assert reply1 + "\n" in text and reply2 + "\n" in text


def test_chat_verb_reads_piped_stdin(model_dir, monkeypatch, capsys, one_thread):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/quit\nnever read\n"))
    assert cli.main(["chat", str(model_dir), "--no-think", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("mode: no_think.")


def test_generate_verb_writes_n_completions_per_prompt(model_dir, tmp_path, capsys, one_thread):
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "chat_template_kwargs": {"enable_thinking": False},
             "answer": "5"},
            {"prompt": "What does json.dumps do?"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["generate", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                     "--n", "3", "--temperature", "1.0", "--max-new-tokens", "6"]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["answer"] for o in out[:1]] == ["5"] and len(out) == 2
    assert all(len(o["completions"]) == 3 and all(t <= 6 for t in o["completion_tokens"]) for o in out)
    assert len({c for o in out for c in o["completions"]}) > 2  # sampled, so they differ
    greedy = tmp_path / "greedy.jsonl"
    assert cli.main(["generate", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(greedy),
                     "--max-new-tokens", "6"]) == 0
    model, tok = load_chat_model(model_dir)
    first = json.loads(greedy.read_text().splitlines()[0])["completions"][0]
    ids = generate(model, [encode_prompt(tok, rows[0]["messages"], enable_thinking=False)], 6, stop_tokens=[end_of_turn_id(tok)])
    assert first == tok.decode(ids[0])


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "last message is an assistant"),
    ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "Hi"}]}, "SmolLM3 SFT bug"),
    ({"text": "Hi"}, "no 'messages'"),
])
def test_generate_refuses_bad_prompt_rows_with_file_and_line(model_dir, tmp_path, capsys, row, message):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(row) + "\n")
    assert cli.main(["generate", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:2: " in err and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_eval_chat_writes_results_table_and_replies(model_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "chat.json"
    assert cli.main(["eval", str(model_dir), "--chat", "--limit", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["chat"]["n"] == {"no_think": 4, "think": 4, "persona": 4}
    assert 0 <= report["chat"]["no_think_accuracy"] <= 1 and len(report["vibe"]) == 4
    replies = out.with_suffix(".replies.jsonl").read_text().splitlines()
    assert len(replies) == 12
    assert "system-prompt adherence" in out.with_suffix(".md").read_text()
