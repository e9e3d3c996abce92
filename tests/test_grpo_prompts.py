"""Prompt sources for GRPO: files with prompt / messages and answer, GSM8K folders, and the one-line
errors for rows without an answer and files without prompts."""

import json

import pytest

from smoltrain.errors import DataError
from smoltrain.post.rl.prompts import load_prompts, reward_columns


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_keep_their_columns_and_take_the_mode_from_the_row_or_the_run(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2 + 2 =", "answer": 4, "topic": "sum"},
        {"messages": [{"role": "user", "content": "3 * 3?"}], "answer": "9", "mode": "think"},
        {"messages": [{"role": "user", "content": "1 + 1?"}], "answer": "2", "chat_template_kwargs": {"enable_thinking": True}},
    ])
    items = load_prompts(str(path), mode="no_think")
    assert [i["mode"] for i in items] == ["no_think", "think", "think"]
    assert items[0] == {"prompt": "2 + 2 =", "answer": "4", "topic": "sum", "mode": "no_think"}
    columns = reward_columns(items, num_generations=2)
    assert columns["answer"] == ["4", "4", "9", "9", "2", "2"] and columns["topic"] == ["sum", "sum", None, None, None, None]
    assert "messages" not in columns and len(load_prompts(str(path), count=2)) == 2


def test_gsm8k_folder_gives_questions_as_user_turns_and_the_final_number(tmp_path):
    rows = [{"question": "Ann has 3 apples and buys 4,000 more. How many?", "answer": "3 + 4000 = 4003\n#### 4,003"}]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "test.jsonl", [{"question": "1 + 2?", "answer": "#### 3"}])
    train = load_prompts(f"gsm8k:{tmp_path}", "train")
    assert train == [{"messages": [{"role": "user", "content": rows[0]["question"]}], "answer": "4003", "mode": "no_think"}]
    assert load_prompts(f"gsm8k:{tmp_path}", "heldout")[0]["answer"] == "3"


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "2 + 2 ="}], r"p\.jsonl:1: the prompt has no 'answer'"),
    ([{"prompt": "ok", "answer": "1"}, {"prompt": "x", "answer": "  "}], r"p\.jsonl:2: the prompt has no 'answer'"),
    ([{"answer": "1"}], r"p\.jsonl:1: the row has neither a non-empty 'prompt' nor 'messages'"),
    ([{"messages": [{"text": "hi"}], "answer": "1"}], r"p\.jsonl:1: 'messages' must be a non-empty list"),
    ([{"prompt": "x", "answer": "1", "mode": "fast"}], r"p\.jsonl:1: mode must be think or no_think"),
    ([], r"p\.jsonl: no prompts in the file"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, rows, message):
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        load_prompts(str(path))
    assert "\n" not in str(info.value)


def test_missing_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such prompt file"):
        load_prompts(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(DataError, match="no GSM8K train files"):
        load_prompts(f"gsm8k:{tmp_path}")


def test_embedded_arithmetic_has_a_disjoint_held_out_split_with_answers():
    train = load_prompts("embedded", "train", "no_think", count=200)
    heldout = load_prompts("embedded", "heldout", "think", count=50)
    assert len(train) == 200 and len(heldout) == 50
    questions = {p["messages"][-1]["content"] for p in train}
    assert not questions & {p["messages"][-1]["content"] for p in heldout}
    assert {p["mode"] for p in train} == {"no_think"} and {p["mode"] for p in heldout} == {"think"}
    # the reference is the problem's own answer: check one worked example by its question text
    from smoltrain.eval.answers import answers_match

    item = next(p for p in train if p["question"].startswith("Compute "))
    a, b, c, d = map(int, item["question"].removeprefix("Compute ").rstrip(".").replace("+", " ").replace("*", " ")
                     .replace("-", " ").split())
    assert answers_match(str(a + b * c - d), item["answer"])
