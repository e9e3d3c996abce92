"""`smoltrain data preferences`: pairs kept or dropped for the stated reasons, math verification,
the summary, rows that train (conversational preference data), and real generation end to end."""

import json
import sys
from pathlib import Path

import pytest

from smoltrain import cli
from smoltrain.config import config_from_dict
from smoltrain.errors import DataError
from smoltrain.model.transformer import build_model
from smoltrain.post.preference import generate as preference_gen
from smoltrain.post.preference.data import TextTokenizer, chat_render, load_preferences
from smoltrain.train.load_model import save_model_folder

sys.path.insert(0, str(Path(__file__).parent))
from chat_helpers import VOCAB, chat_tokenizers  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefgen")
    chat_tokenizers(root)
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_seq_len=256)
    config = config_from_dict({"model": shape, "data": {"seq_len": 32}, "train": {"micro_batch_size": 1, "global_batch_tokens": 32}})
    for name, seed in (("strong", 1), ("weak", 2)):
        save_model_folder(build_model(config.model, seed=seed), config, root / name, tokenizer=root / "smollm3")
    return root


def _fake_replies(answers):
    """Stand-in for generation: model folder name -> list of (text, stopped)."""
    def replies(model, tokenizer, prompts, max_new_tokens, batch_size=32, **kwargs):
        name = Path(model.source).name
        return [{"text": t, "tokens": len(t.split()), "stopped": s} for t, s in answers[name][: len(prompts)]]
    return replies


def test_pairs_are_kept_or_dropped_for_the_stated_reasons(models, tmp_path, monkeypatch, capsys):
    import smoltrain.post.chat.evals as chat_eval
    import smoltrain.train.load_model as load_model

    real_load_any = load_model.load_any

    def load_any(path, device="cpu"):
        model, config, tok = real_load_any(path, device)
        model.source = str(path)
        return model, config, tok

    monkeypatch.setattr(load_model, "load_any", load_any)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(chat_eval, "generate_replies", _fake_replies({
        "strong": [("The answer is 1.", True), ("The answer is 2.", True), ("The answer is 3.", True),
                   ("The answer is 4.", False), ("", True), ("The answer is 9.", True)],
        "weak": [("The answer is 5.", True), ("It is 2.", True), ("The answer is 3.", True),
                 ("The answer is 0.", True), ("The answer is 1.", True), ("The answer is 2.", True)],
    }))
    out = tmp_path / "pairs.jsonl"
    code = cli.main(["data", "preferences", "--prompts", str(prompts), "--chosen-model", str(models / "strong"),
                     "--rejected-model", str(models / "weak"), "--out", str(out), "--no-think", "--verify", "math"])
    assert code == 0
    assert ("1 pairs were dropped because an answer reached --max-new-tokens 512 (cut, not finished): raise "
            "--max-new-tokens to keep them") in capsys.readouterr().out
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    # 0 kept; 1 rejected is right; 2 identical; 3 chosen cut; 4 chosen empty; 5 chosen wrong
    assert summary["kept"] == 1 and summary["prompts"] == 6
    assert summary["dropped"] == {"cut_at_max_tokens": 1, "empty_answer": 1, "identical": 1, "rejected_right": 1,
                                  "chosen_wrong": 1}
    assert summary["chosen_accuracy"] == pytest.approx(4 / 6) and summary["rejected_accuracy"] == pytest.approx(2 / 6)
    row = json.loads(out.read_text())
    assert row == {"prompt": [{"role": "user", "content": "What is 0 + 1?"}],
                   "chosen": [{"role": "assistant", "content": "The answer is 1."}],
                   "rejected": [{"role": "assistant", "content": "The answer is 5."}],
                   "chat_template_kwargs": {"enable_thinking": False}}
    # the output is preference data that loads through the chat template
    tok = TextTokenizer.load(models / "smollm3")
    assert len(load_preferences(out, tok, render=chat_render(models / "smollm3"))) == 1


def test_reference_replies_against_a_real_weak_model_end_to_end(models, tmp_path):
    """Real generation through the template by a random weak model (no usable answer): chosen from the
    embedded worked solutions."""
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(DataError, match="no pair was kept out of 4 prompts"):
        preference_gen.build_preferences("embedded", "reference", str(models / "weak"), out, mode="no_think",
                                         verify="math", count=4, max_new_tokens=8, device="cpu")
    with pytest.raises(DataError, match="out of 3 prompts \\(identical: 3\\)"):  # the same replies are never a pair
        preference_gen.build_preferences("embedded", "reference", "reference", out, mode="think", count=3)
    assert not out.exists()


def test_bad_prompt_files_are_file_line_errors(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    code = cli.main(["data", "preferences", "--prompts", str(prompts), "--chosen-model", "reference",
                     "--rejected-model", "reference", "--out", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "p.jsonl:2: the prompt ends with an assistant message" in capsys.readouterr().err
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n")
    code = cli.main(["data", "preferences", "--prompts", str(prompts), "--chosen-model", "reference",
                     "--rejected-model", "reference", "--out", str(tmp_path / "o.jsonl"), "--verify", "math"])
    assert code == 2
    assert "p.jsonl:1: --verify math needs an 'answer'" in capsys.readouterr().err


def test_plain_text_pairs_for_a_pretrained_model(models, tmp_path, monkeypatch):
    """--plain: the corpus's own 'Question: ... Answer:' layout, answers cut at the first blank line."""
    import smoltrain.model.generate as generate_module
    from smoltrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(models / "smollm3")
    outputs = iter([" The answer is 7.\n\nQuestion: next", " 5 + 5 = 10\n#### 10\n\nQuestion:", " no stop here" * 30])

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        return [tok.encode(next(outputs)).ids[:max_new_tokens] for _ in prompts]

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    out = tmp_path / "plain.jsonl"
    summary = preference_gen.build_preferences("embedded", "reference", str(models / "weak"), out, verify="math",
                                               count=3, batch_size=1, device="cpu", plain=True,
                                               max_new_tokens=40)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["kept"] + sum(summary["dropped"].values()) == 3 and summary["dropped"].get("cut_at_max_tokens") == 1
    first = rows[0]
    assert first["prompt"].startswith("Question: ") and first["prompt"].endswith("\nAnswer:")
    assert first["chosen"].endswith(f"\n#### {first['chosen'].split('#### ')[1]}") and "\n\n" not in first["rejected"]
    tok_text = TextTokenizer.load(models / "smollm3")
    assert len(load_preferences(out, tok_text)) == len(rows)  # plain rows load without a template


def test_rule_pairs_keep_a_chosen_reply_that_keeps_the_rule_and_a_rejected_one_that_breaks_it(models, tmp_path, monkeypatch):
    """--prompts embedded:persona --verify rule: SmolLM3's instruction-following pairs in small. On an
    arithmetic question both replies must also be right, so the pair differs in the rule alone."""
    import smoltrain.post.chat.evals as chat_eval
    from smoltrain.eval.answers import is_correct
    from smoltrain.post.embedded import apply_rule, follows_rule

    prompts = preference_gen.read_prompts("embedded:persona", 6, "no_think")
    assert [p["kind"] for p in prompts] == ["arithmetic", "stdlib"] * 3
    assert all(follows_rule(p["rule"], p["reference"]) for p in prompts)  # the references keep their rules
    assert all(is_correct(p["reference"], p["answer"]) for p in prompts if p["kind"] == "arithmetic")
    # each row's counterfactual: the same answer under another rule, which breaks this one
    assert all(p["rule_breaking"] and not follows_rule(p["rule"], p["rule_breaking"]) for p in prompts)
    assert all(is_correct(p["rule_breaking"], p["answer"]) for p in prompts if p["kind"] == "arithmetic")

    def breaks(answer):  # mixed case, no rule's first or last word, 9 words: breaks every rule there is
        return f"THE ANSWER IS {answer}, said plainly and at length today, friend"

    assert not any(follows_rule(p["rule"], breaks(3)) for p in prompts)
    wrong = int(float(prompts[4]["answer"])) + 1
    weak = [(prompts[0]["reference"], True),  # identical to the chosen reply
            (apply_rule(prompts[1]["rule"], "The answer is 3.", "3"), True),  # keeps its rule: nothing to learn
            (breaks(prompts[2]["answer"]), True),  # breaks the rule, right answer: kept
            (breaks(3), False),  # cut at the token limit
            (breaks(wrong), True),  # breaks the rule and the arithmetic: the row's counterfactual stands in
            (breaks(3), True)]  # a question without arithmetic: kept
    monkeypatch.setattr(chat_eval, "generate_replies", lambda model, tok, p, *a, **k: [
        {"text": t, "tokens": len(t.split()), "stopped": s} for t, s in weak[: len(p)]])
    out = tmp_path / "rules.jsonl"
    summary = preference_gen.build_preferences("embedded:persona", "reference", str(models / "weak"), out,
                                               mode="no_think", verify="rule", count=6, device="cpu")
    assert summary["kept"] == 3 and summary["rejected_rewritten"] == 1
    assert summary["dropped"] == {"cut_at_max_tokens": 1, "identical": 1, "rejected_keeps_rule": 1}
    assert summary["chosen_adherence"] == 1.0 and summary["rejected_adherence"] == pytest.approx(2 / 6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"][1]["content"] for r in rows] == [prompts[i]["messages"][1]["content"] for i in (2, 4, 5)]
    assert rows[0]["chosen"][0]["content"] == prompts[2]["reference"]
    assert rows[0]["rejected"][0]["content"] == breaks(prompts[2]["answer"])
    assert rows[1]["rejected"][0]["content"] == prompts[4]["rule_breaking"]

    # prompt rows without a counterfactual: a pair whose rejected answer is wrong is dropped
    plain_rows = tmp_path / "persona.jsonl"
    plain_rows.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "rule_breaking"}) + "\n"
                                  for p in prompts))
    summary = preference_gen.build_preferences(str(plain_rows), "reference", str(models / "weak"), out,
                                               mode="no_think", verify="rule", count=6, device="cpu")
    assert summary["kept"] == 2 and summary["rejected_rewritten"] == 0
    assert summary["dropped"]["rejected_wrong_answer"] == 1


def test_rule_verification_needs_a_known_rule(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "reference": "HELLO", "rule": "shout"}) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: --verify rule needs a 'rule' in every prompt row.*got 'shout'"):
        preference_gen.build_preferences(str(prompts), "reference", "reference", tmp_path / "o.jsonl", verify="rule")
