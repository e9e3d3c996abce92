"""Generative scoring: answer normalisation, pass@k against enumeration, and exact match of
greedy answers against a brute-force decoder (one full forward per new token, no cache)."""

import itertools

import pytest
import torch
from test_eval_scoring import tiny_model, tiny_tokenizer

from smoltrain.eval.generative import (
    cut_at_stop,
    exact_match,
    normalize_answer,
    pass_at_k,
    quasi_exact_match,
    score_generative,
)
from smoltrain.eval.scoring import encode
from smoltrain.eval.tasks import Task


@pytest.mark.parametrize("prediction, gold, exact, quasi", [
    ("19", "19", True, True),
    (" 19 ", "19", True, True),
    ("1,000", "1000", False, True),
    ("12.50", "12.5", False, True),
    ("3.0", "3", False, True),
    ("The Answer.", "answer", False, True),
    ("an   apple", "Apple", False, True),
    ("-7", "7", False, False),
    ("19", "91", False, False),
    ("1,2,3", "123", False, False),
])
def test_exact_and_quasi_exact_match(prediction, gold, exact, quasi):
    assert exact_match(prediction, gold) is exact
    assert quasi_exact_match(prediction, gold) is quasi


def test_gsm8k_style_extraction_reads_worked_solutions():
    assert quasi_exact_match("She has 3 + 4 = 7 apples, so $1,250.00 in all.", "1250", extract="last_number")
    assert quasi_exact_match("48 / 2 = 24 clips. Total 48 + 24 = 72", "72", extract="last_number")
    assert not quasi_exact_match("no numbers here", "72", extract="last_number")
    assert normalize_answer("  The  QUICK, brown fox!") == "quick brown fox"


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 4), (7, 1, 7), (3, 1, 2)])
def test_pass_at_k_equals_enumeration_over_all_k_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_cut_at_stop_uses_the_earliest_stop_sequence():
    assert cut_at_stop(" 19\nQuestion: next", ["Question:", "\n"]) == " 19"
    assert cut_at_stop("no stop", ["\n"]) == "no stop"


def _brute_force_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_exact_match_counts_items_whose_answer_the_model_really_writes():
    tok = tiny_tokenizer()
    model = tiny_model(seed=1)
    queries = ["Question: What is 12 + 7?\nAnswer:", "def parse(items):\n", "The semantics", "class Parser", "for value in"]
    items = []
    for i, query in enumerate(queries):
        written = tok.decode(_brute_force_greedy(model, encode(tok, query), 4))
        # Even items carry what the model writes (so they must match), odd ones something else.
        answer = written if i % 2 == 0 else written + " and more"
        items.append({"query": query, "answer": answer, "stop": ["\u0000"]})
    task = Task(name="gen", kind="generative", items=items, max_new_tokens=4)
    details = []
    result = score_generative(model, tok, task, batch_size=2, details=details)
    assert [d["predictions"][0] for d in details[::2]] == [items[i]["answer"] for i in range(0, len(items), 2)]
    assert result["exact_match"] == pytest.approx(3 / 5)
    assert result["n"] == 5


def test_sampling_reports_avg_and_pass_at_k_consistently():
    tok = tiny_tokenizer()
    model = tiny_model(seed=2)
    items = [{"query": q, "answer": a, "stop": ["\n"]} for q, a in [("Question: 1 + 1?\nAnswer:", "2"), ("x", "y")]]
    task = Task(name="sampled", kind="generative", items=items, num_samples=4, temperature=1.0, max_new_tokens=3)
    details = []
    result = score_generative(model, tok, task, seed=5, details=details)
    per_item = [sum(d["correct"]) for d in details]
    assert result["avg@4"] == pytest.approx(sum(c / 4 for c in per_item) / 2)
    assert result["pass@4"] == pytest.approx(sum(c > 0 for c in per_item) / 2)
    assert all(len(d["predictions"]) == 4 for d in details)
    # Same seed, same samples.
    again = []
    score_generative(model, tok, task, seed=5, details=again)
    assert [d["predictions"] for d in again] == [d["predictions"] for d in details]
