"""The embedded suite: a pure function of its seed, well-formed items whose answers tokenise the
same alone as after the context (for GPT-2 and Llama-3 style pre-tokenisers), correct arithmetic,
and the centred aggregate against its formula."""

import re

import pytest
from test_eval_scoring import tiny_tokenizer

from smoltrain.eval.scoring import encode, encode_pair
from smoltrain.eval.suite import SUITE, aggregate, centred, embedded_suite, embedded_task, prose_cloze


@pytest.fixture(scope="module")
def suite():
    return embedded_suite(seed=0, num_items=60)


def test_suite_is_a_pure_function_of_the_seed(suite):
    assert [t.name for t in suite] == list(SUITE)
    again = embedded_suite(seed=0, num_items=60)
    assert [t.items for t in suite] == [t.items for t in again]
    other = embedded_suite(seed=1, num_items=60)
    for a, b in zip(suite, other):
        assert a.items != b.items
    # More items extend, they do not reshuffle, the arithmetic and code tasks.
    assert embedded_task("arithmetic_choice", 0, 80).items[:60] == suite[0].items


def test_items_are_well_formed_with_distinct_choices_and_uniform_baselines(suite):
    for task in suite:
        assert len(task.items) == 60
        assert len({item["query"] + str(item.get("choices")) for item in task.items}) == 60
        if task.kind == "multiple_choice":
            assert task.baseline == pytest.approx(0.25)
            for item in task.items:
                assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
            # Gold positions are spread, so always picking one slot scores near the baseline.
            positions = [item["gold"] for item in task.items]
            assert max(positions.count(i) for i in range(4)) < 30
        else:
            assert task.baseline == 0.0


def test_arithmetic_answers_are_the_true_results(suite):
    choice, answer = suite[0], suite[1]
    for item in choice.items:
        expression = re.search(r"Compute (.+)\.\n", item["query"]).group(1)
        assert item["query"].endswith(f"Answer: {expression} =")
        assert item["choices"][item["gold"]] == f" {eval(expression)}"
    for item in answer.items:
        expression = re.search(r"Compute (.+)\.\n", item["query"]).group(1)
        assert item["answer"] == str(eval(expression))


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_answers_tokenise_the_same_alone_as_after_the_context(suite, style):
    if style == "gpt2":
        tok = tiny_tokenizer(400)
    else:
        from smoltrain.data.tokenizer import train_tokenizer

        text = [item["query"] + item["choices"][item["gold"]] for t in suite if t.kind == "multiple_choice" for item in t.items]
        tok = train_tokenizer(text * 3, 400, show_progress=False)
    for task in suite:
        if task.kind != "multiple_choice":
            continue
        for item in task.items:
            for choice in item["choices"]:
                context_ids, answer_ids = encode_pair(tok, item["query"], choice)
                assert answer_ids == encode(tok, choice), (task.name, item["query"][-30:], choice)
                assert context_ids == encode(tok, item["query"])


def test_prose_cloze_asks_for_the_last_word_of_a_source_sentence():
    paragraphs = ["The quick brown fox jumps over the lazy sleeping dog. The river flows quietly to the distant sea.",
                  "A small bird sings in the tall green tree every morning. Nothing here is longer than a short sentence today.",
                  "Every student in the class wrote a long essay about history. We walked along the beach at sunset yesterday evening."]
    task = prose_cloze(seed=3, num_items=4, paragraphs=paragraphs)
    sentences = [s for p in paragraphs for s in re.split(r"(?<=\.) ", p)]
    for item in task.items:
        whole = item["query"] + item["choices"][item["gold"]] + "."
        assert whole in sentences
        assert all(c.startswith(" ") and c[1:].isalpha() for c in item["choices"])


def test_centred_aggregate_is_the_mean_of_acc_minus_baseline_over_one_minus_baseline():
    assert centred(0.25, 0.25) == 0.0 and centred(1.0, 0.25) == 1.0 and centred(0.0, 0.5) == -1.0
    results = {
        "a": {"score": 0.5, "random_baseline": 0.25, "centred": centred(0.5, 0.25)},
        "b": {"score": 0.3, "random_baseline": 0.0, "centred": centred(0.3, 0.0)},
    }
    expected = ((0.5 - 0.25) / 0.75 + 0.3) / 2
    assert aggregate(results) == pytest.approx({"centred": expected, "score": 0.4, "random_baseline": 0.125, "tasks": 2})
