"""Task files: validation with file:line errors (exit 2 from the CLI), few-shot determinism and
exclusion, prompt building, task specs."""

import json

import pytest

from smoltrain.cli import main
from smoltrain.errors import ConfigError, DataError
from smoltrain.eval.run import resolve_tasks
from smoltrain.eval.tasks import Task, build_prompt, fewshot_examples, fewshot_indices, read_task_file, to_mcf


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"query": "Question: 2 + 2?\nAnswer:", "choices": [" 4", " 5"], "gold": 0}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({"query": "q", "choices": [" a", " b"], "gold": 2}, "gold 2 is out of range for 2 choices"),
    ({"query": "q", "choices": [" a"], "gold": -1}, "gold -1 is out of range"),
    ({"query": "q", "choices": [], "gold": 0}, "'choices' must be a non-empty list"),
    ({"query": "q", "choices": [" a", ""], "gold": 0}, "choices[1] must be a non-empty string"),
    ({"query": "q", "choices": [" a"], "gold": "0"}, "'gold' must be an integer"),
    ({"query": "q", "choices": [" a"], "gold": True}, "'gold' must be an integer"),
    ({"choices": [" a"], "gold": 0}, "'query' must be a string"),
    ({"query": "q"}, "either 'choices'"),
    ({"query": "q", "answer": "4", "choices": [" a"], "gold": 0}, "either 'choices'"),
    ({"query": "q", "answer": 4}, "'answer' must be a string"),
    ([1, 2], "expected a JSON object"),
    ({"query": "q", "answer": "4"}, "mixes generative and multiple_choice"),
])
def test_bad_task_file_line_gives_one_line_error_naming_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "task.jsonl", [GOOD, "", bad])
    with pytest.raises(DataError) as error:
        read_task_file(path)
    text = str(error.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_empty_task_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no items"):
        read_task_file(_write(tmp_path / "empty.jsonl", [""]))


def test_cli_eval_with_bad_task_file_exits_2_with_one_line(tmp_path, capsys):
    from test_eval_scoring import tiny_model, tiny_tokenizer

    from smoltrain.train.load_model import save_model_folder

    model = tiny_model()
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    from smoltrain.config import Config, DataConfig

    config = Config(model=model.config, data=DataConfig(seq_len=model.config.max_seq_len))
    save_model_folder(model, config, tmp_path / "model", tokenizer=tmp_path / "tokenizer.json")
    bad = _write(tmp_path / "bad.jsonl", [GOOD, {"query": "q", "choices": [" a"], "gold": 3}])
    code = main(["eval", str(tmp_path / "model"), "--task-file", str(bad), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"smoltrain eval: error: {bad}:2: gold 3 is out of range for 1 choices"
    assert not (tmp_path / "r.json").exists()


def test_fewshot_draws_are_deterministic_distinct_and_never_the_item_itself():
    items = [{"query": f"q{i}", "choices": [" a", " b"], "gold": i % 2} for i in range(30)]
    task = Task(name="t", kind="multiple_choice", items=items, num_fewshot=5)
    for index in range(30):
        shots = fewshot_examples(task, index, seed=1)
        assert len(shots) == 5 and len({s["query"] for s in shots}) == 5
        assert items[index] not in shots
        assert shots == fewshot_examples(task, index, seed=1)
    assert [fewshot_examples(task, i, 1) for i in range(30)] != [fewshot_examples(task, i, 2) for i in range(30)]
    # An item's prompt does not depend on --limit (the pool stays whole).
    assert build_prompt(task.limited(3), 2, seed=1) == build_prompt(task, 2, seed=1)
    # A pure function: same draw in a fresh call with the same arguments.
    assert fewshot_indices(10, 3, 0, "t", 4, exclude=[4]) == fewshot_indices(10, 3, 0, "t", 4, exclude=[4])
    assert 4 not in fewshot_indices(10, 9, 0, "t", 4, exclude=[4])


def test_fewshot_prompt_joins_solved_examples_before_the_query():
    pool = [{"query": "Q: 1 + 1?\nA:", "choices": [" 2", " 3"], "gold": 0},
            {"query": "Q: 2 + 2?\nA:", "choices": [" 5", " 4"], "gold": 1}]
    item = {"query": "Q: 3 + 3?\nA:", "choices": [" 6", " 7"], "gold": 0}
    task = Task(name="t", kind="multiple_choice", items=[item], fewshot_pool=pool, num_fewshot=2)
    context, _ = build_prompt(task, 0, seed=0)
    shots = fewshot_examples(task, 0, seed=0)
    assert context == "\n\n".join([s["query"] + s["choices"][s["gold"]] for s in shots] + [item["query"]])
    assert {s["query"] for s in shots} == {p["query"] for p in pool}


def test_generative_fewshot_target_and_lettered_examples():
    gen = Task(name="g", kind="generative", num_fewshot=1, items=[
        {"query": "Q: 1 + 1?\nA:", "answer": "2", "stop": ["\n"]},
        {"query": "Q: 2 + 2?\nA:", "answer": "4", "stop": ["\n"], "fewshot_target": " 2 + 2 = 4. #### 4"},
    ])
    assert build_prompt(gen, 0)[0] == "Q: 2 + 2?\nA: 2 + 2 = 4. #### 4\n\nQ: 1 + 1?\nA:"
    assert build_prompt(gen, 1)[0] == "Q: 1 + 1?\nA: 2\n\nQ: 2 + 2?\nA:"
    item = {"query": "Question: Sky?\nAnswer:", "question": "Sky?", "choices": [" blue", " green"], "gold": 0,
            "instruction": "The following are multiple choice questions (with answers) about colours."}
    assert to_mcf(item)["query"] == ("The following are multiple choice questions (with answers) about colours.\n\n"
                                     "Sky?\nA. blue\nB. green\nAnswer:")


def test_task_specs_resolve_files_groups_and_formulations(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [GOOD, {**GOOD, "query": "other"}])
    tasks = resolve_tasks(["arithmetic", str(path), f"{path}@mcf"], limit=5, num_fewshot=1)
    assert [t.name for t in tasks] == ["arithmetic_choice", "arithmetic_answer", "mine", "mine_mcf"]
    assert all(len(t.items) <= 5 and t.num_fewshot == 1 for t in tasks)
    assert tasks[3].formulation == "mcf"
    with pytest.raises(ConfigError, match="did you mean 'code_tokens'"):
        resolve_tasks(["code_token"])
    with pytest.raises(ConfigError, match="ADAPTER=PATH"):
        resolve_tasks(["hellaswag"])
    with pytest.raises(ConfigError, match="multiple-choice tasks only"):
        resolve_tasks(["arithmetic_answer@mcf"])


def test_an_items_own_fewshot_pool_is_validated_and_used(tmp_path):
    shot = {"query": "Q: 1 + 1?\nA:", "choices": [" 2", " 3"], "gold": 0}
    item = {**GOOD, "fewshot": [shot]}
    task = read_task_file(_write(tmp_path / "pool.jsonl", [item, {**GOOD, "query": "other"}]))
    task.num_fewshot = 3
    assert build_prompt(task, 0)[0] == "Q: 1 + 1?\nA: 2\n\n" + GOOD["query"]
    bad = _write(tmp_path / "bad.jsonl", [{**GOOD, "fewshot": [{"query": "q", "choices": [" a"], "gold": 1}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: fewshot\[0\]: gold 1 is out of range"):
        read_task_file(bad)
