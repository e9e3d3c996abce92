"""Long-context evals: every RULER-style generator is deterministic for a seed and fits its length within
one haystack unit, the answers are in the prompt, the scorer follows RULER's string_match_all on hand-made
answers, and loss by position equals a brute-force per-position mean."""

import random
import re
import string

import pytest
import torch
from test_eval_scoring import tiny_model, tiny_tokenizer

from smoltrain.config import ModelConfig
from smoltrain.errors import ConfigError, DataError
from smoltrain.eval.longctx import (
    LONG_CONTEXT_TASKS,
    NIAH,
    NOISE,
    LongContextTask,
    generate_items,
    loss_by_position,
    parse_long_context_spec,
    position_buckets,
    score_long_context,
    string_match_all,
)
from smoltrain.eval.scoring import encode
from smoltrain.model.transformer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# An essay haystack of plain sentences (the embedded prose takes seconds to build; tested by the real-model run).
_WORDS = ["".join(random.Random(i).choices(string.ascii_lowercase, k=6)) for i in range(800)]
ESSAY = " ".join(f"Sentence number {i} talks about the {w} of the river and the hills beyond it." for i, w in enumerate(_WORDS))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(300)


def _task(name, length=2048, items=3, seed=0):
    return LongContextTask(name=f"{name}@{length}", task=name, length=length, num_items=items, seed=seed,
                           haystack_text=ESSAY)


@pytest.mark.parametrize("name", LONG_CONTEXT_TASKS)
def test_each_generator_is_seeded_fits_its_length_and_hides_its_answers(tokenizer, name):
    first, again = generate_items(_task(name), tokenizer), generate_items(_task(name), tokenizer)
    assert first == again
    other = generate_items(_task(name, seed=1), tokenizer)
    assert [i["outputs"] for i in other] != [i["outputs"] for i in first]
    budget = 2048 - _task(name).tokens_to_generate
    for item in first:
        used = len(encode(tokenizer, item["input"] + item["answer_prefix"]))
        # One haystack unit more would not fit: the length is met within a unit (a noise paragraph, a sentence, a word).
        unit = len(encode(tokenizer, NOISE + "\n")) + 8 if name != "cwe" else 3 * 8
        assert budget - unit <= used <= budget, (used, budget)
        assert item["length"] == used + _task(name).tokens_to_generate
        for answer in item["outputs"]:
            if name == "cwe":  # the common words appear many times
                assert len(re.findall(rf"\d+\. {answer}\b", item["input"])) >= 6
            elif name == "vt":  # each variable of the chain is assigned once
                assert item["input"].count(f"VAR {answer} = ") == 1, answer
            else:  # the needles' values once (the passkey's line says it twice)
                assert item["input"].count(answer) == (2 if name == "passkey" else 1), answer


def test_needle_templates_are_rulers_singular_and_plural_forms(tokenizer):
    single = generate_items(_task("niah_single_1", items=1), tokenizer)[0]
    assert single["input"].startswith("A special magic number is hidden within the following text.")
    assert single["answer_prefix"].endswith("mentioned in the provided text is")
    assert re.search(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", single["input"])
    multi = generate_items(_task("niah_multiquery", items=1), tokenizer)[0]
    assert multi["input"].startswith("Some special magic numbers are hidden")
    assert len(multi["outputs"]) == 4 and ", and " in multi["answer_prefix"]
    multivalue = generate_items(_task("niah_multivalue", items=1), tokenizer)[0]
    key = re.search(r"for ([a-z]+-[a-z]+) mentioned", multivalue["answer_prefix"])[1]
    assert sorted(re.findall(rf"for {key} is: (\d+)\.", multivalue["input"])) == sorted(multivalue["outputs"])
    assert NIAH["niah_multikey_3"].key_kind == "uuids"


def test_scorer_is_rulers_string_match_all_on_hand_made_answers():
    assert string_match_all(" 1234567.\nThe rest", ["1234567"]) == 1.0
    assert string_match_all("  APPLE, pear\x00", ["apple", "Pear", "plum"]) == pytest.approx(2 / 3)
    assert string_match_all("nothing here", ["1234567"]) == 0.0
    assert string_match_all("123456", ["1234567"]) == 0.0  # a prefix of the value is no match


def test_a_haystack_with_too_few_words_for_the_length_is_a_one_line_error(tokenizer):
    short = LongContextTask(name="cwe@2048", task="cwe", length=2048, num_items=1, haystack_text="A few words only here. " * 20)
    with pytest.raises(DataError, match="distinct words"):
        generate_items(short, tokenizer)


def test_scoring_a_model_that_always_answers_the_value_gives_one(tokenizer, monkeypatch):
    """The generation path with a stand-in model that writes the expected value: 1.0; one that does not: 0."""
    import smoltrain.model.generate as generate_module

    task = _task("passkey", items=2)
    items = generate_items(task, tokenizer)
    answers = iter(items)
    monkeypatch.setattr(generate_module, "generate", lambda model, prompts, **kw: [encode(tokenizer, " " + next(answers)["outputs"][0])])
    assert score_long_context(None, tokenizer, task)["ruler_match"] == 1.0
    monkeypatch.setattr(generate_module, "generate", lambda model, prompts, **kw: [encode(tokenizer, " 0")])
    result = score_long_context(None, tokenizer, task)
    assert result["ruler_match"] == 0.0 and result["n"] == 2


def test_specs_parse_lengths_and_name_unknown_tasks():
    assert parse_long_context_spec("passkey@8192") == ("passkey", 8192)
    assert parse_long_context_spec("niah_single_1@8k") == ("niah_single_1", 8192)
    assert parse_long_context_spec("arithmetic_choice") is None
    with pytest.raises(ConfigError, match="known: niah_single_1"):
        parse_long_context_spec("needle@4096")


def test_loss_by_position_equals_a_brute_force_mean_per_position_bucket():
    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=64), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 32), generator=g)
    documents = torch.cat([torch.zeros(3, 20, dtype=torch.long), torch.ones(3, 12, dtype=torch.long)], dim=1)
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)
    curve = loss_by_position(model, [{"input_ids": ids, "labels": labels, "document_ids": documents}], buckets=4)
    # Brute force: each document alone, one token at a time from its logits.
    per_position: dict[int, list[float]] = {}
    with torch.no_grad():
        for row in range(3):
            for start, end in ((0, 20), (20, 32)):
                logits = model(ids[row : row + 1, start:end])[0].log_softmax(-1)
                for t in range(end - start):
                    if labels[row, start + t] != -100:
                        per_position.setdefault(t, []).append(-logits[t, labels[row, start + t]].item())
    assert [(c["start"], c["end"]) for c in curve] == position_buckets(32, 4)
    for bucket in curve:
        values = [v for p in range(bucket["start"], bucket["end"]) for v in per_position.get(p, [])]
        assert bucket["tokens"] == len(values)
        assert bucket["loss"] == pytest.approx(sum(values) / len(values), abs=1e-5)


def test_a_random_model_finds_no_passkey(tokenizer):
    """Guards against the answer leaking into the answer prefix: an untrained model scores 0."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), max_seq_len=512)
    result = score_long_context(model, tokenizer, _task("passkey", length=1024, items=2))
    assert result["ruler_match"] == 0.0


def test_in_training_eval_scores_long_context_tasks_and_the_position_curve_and_the_report_draws_them(tmp_path):
    from test_eval_run import _validation_setup

    from smoltrain.eval.during_training import evaluate_during_training
    from smoltrain.eval.run import write_results
    from smoltrain.report.document import Report
    from smoltrain.report.run import add_long_context_section

    haystack = tmp_path / "essay.txt"
    haystack.write_text(ESSAY)
    model, config, _ = _validation_setup(tmp_path, tasks=["passkey@1024", "niah_single_2@1024"], limit=2, val_batches=2,
                                         batch_size=3, position_buckets=3, haystack_files=[str(haystack)])
    result = evaluate_during_training(model, config, torch.device("cpu"))
    assert {name: r["n"] for name, r in result["tasks"].items()} == {"passkey@1024": 2, "niah_single_2@1024": 2}
    assert all(r["ruler_match"] == 0.0 for r in result["tasks"].values())  # an untrained model
    assert set(result["loss_by_position"]) == {"code", "prose"}
    assert sum(c["tokens"] for c in result["loss_by_position"]["code"]) == result["val"]["code"]["tokens"]  # every token once
    write_results({"tasks": result["tasks"], "aggregate": {}, "val": {}}, tmp_path / "results.json")
    assert "| passkey | 0 |" in (tmp_path / "results.md").read_text()
    report = Report("t")
    add_long_context_section(report, result, tmp_path / "figures")
    assert (tmp_path / "figures" / "long_context.png").is_file() and (tmp_path / "figures" / "loss_by_position.png").is_file()


def test_eval_with_yarn_stretches_the_trained_length_without_training(tmp_path):
    from test_eval_run import _model_folder

    from smoltrain.config import RopeScaling
    from smoltrain.eval.run import evaluate
    from smoltrain.model.attention import rotary_tables

    _, model = _model_folder(tmp_path)
    report = evaluate(model, ["passkey@1024"], limit=1, device="cpu", progress=False, yarn_factor=8.0,
                      tokenizer=tmp_path / "tokenizer.json")
    assert report["provenance"]["yarn_factor"] == 8.0 and report["tasks"]["passkey@1024"]["n"] == 1
    # The model scored with the YaRN tables over its trained window (128 tokens x 8), built independently here.
    assert model.rope_scaling == RopeScaling(factor=8.0, original_max_seq_len=128)
    length = model.rope_cos.shape[0]  # extended by generation to the prompt + answer (about 1000)
    expected, _ = rotary_tables(model.config.resolved_head_dim, length, model.config.rope_theta,
                                scaling=RopeScaling(factor=8.0, original_max_seq_len=128))
    assert length > 900 and torch.equal(model.rope_cos, expected)
