"""Each benchmark adapter on small fixtures written in its published layouts (Hugging Face
parquet and the original release), checked against the prompts lighteval builds."""

from pathlib import Path

import pytest

from smoltrain.errors import DataError
from smoltrain.eval.adapters import load_adapter_task
from smoltrain.eval.run import resolve_tasks
from smoltrain.eval.tasks import build_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _items(name, path, **kwargs):
    return load_adapter_task(name, FIXTURES / path, **kwargs).items


def _strip(items, keys=("query", "choices", "gold")):
    return [{k: item[k] for k in keys} for item in items]


def test_hellaswag_original_and_hugging_face_layouts_give_the_same_cloze_items():
    original = _items("hellaswag", "hellaswag/hellaswag_val.jsonl")
    hf = _items("hellaswag", "hellaswag_hf")  # a folder: the validation files; unlabelled test rows never read
    assert _strip(original) == _strip(hf)
    first, second = original
    assert first["query"] == "Baking cookies: A woman pours flour into a bowl. She"
    assert first["choices"][0] == " paints the bowl. blue."  # " [title]" -> ". ", as lighteval's preprocess
    assert first["gold"] == 2
    assert second["query"] == "Personal Care and Style: How to tie a tie. Drape the tie around your neck."
    assert second["choices"][2] == " Throw the tie away."


def test_arc_flat_and_nested_layouts_with_letter_and_number_keys():
    hf = _items("arc_easy", "arc/ARC-Easy")
    original = _items("arc_easy", "arc_original/ARC-Easy-Test.jsonl")
    assert _strip(hf) == _strip(original)
    assert hf[0] == {"id": "Mercury_1", "query": "Question: Which gas do plants take in for photosynthesis?\nAnswer:",
                     "question": "Which gas do plants take in for photosynthesis?",
                     "choices": [" oxygen", " carbon dioxide", " nitrogen", " helium"], "gold": 1}
    assert hf[1]["gold"] == 2  # answerKey "3" among labels "1".."4"
    assert len(hf[2]["choices"]) == 3


def test_piqa_reads_labels_from_the_lst_file_of_the_original_release():
    original = _items("piqa", "piqa/valid.jsonl")
    assert _strip(original) == _strip(_items("piqa", "piqa_hf"))
    assert original[1] == {"query": "Question: To open a stuck jar lid,\nAnswer:", "question": "To open a stuck jar lid,",
                           "choices": [" freeze the jar overnight.", " run the lid under hot water."], "gold": 1}


def test_winogrande_scores_the_sentence_end_after_each_option():
    items = _items("winogrande", "winogrande/dev.jsonl")
    assert _strip(items) == _strip(_items("winogrande", "winogrande_hf"))
    assert items[0]["query"] == "The trophy does not fit in the suitcase because the "
    assert items[0]["choices"] == ["trophy is too big.", "suitcase is too big."]
    assert items[0]["gold"] == 0 and items[1]["gold"] == 1


def test_openbookqa_and_commonsense_qa_layouts():
    obqa = _items("openbookqa", "openbookqa/main")
    assert _strip(obqa) == _strip(_items("openbookqa", "openbookqa_original/test.jsonl"))
    assert obqa[0]["query"] == "The sun is responsible for" and obqa[0]["gold"] == 1
    csqa = _items("commonsense_qa", "commonsense_qa")  # validation parquet; the unlabelled test split is not read
    assert _strip(csqa) == _strip(_items("commonsense_qa", "commonsense_qa_original/dev_rand_split.jsonl"))
    assert csqa[0]["query"] == "Question: Where would you put a plate after washing it?\nAnswer:"
    assert csqa[0]["choices"][0] == " cupboard" and csqa[0]["gold"] == 0 and len(csqa[0]["choices"]) == 5


def test_mmlu_parquet_and_csv_layouts_and_same_subject_fewshot_from_dev():
    hf = load_adapter_task("mmlu", FIXTURES / "mmlu/all", num_fewshot=2)
    csv_items = _items("mmlu", "mmlu_original/data/test/elementary_mathematics_test.csv")
    assert _strip(hf.items[:1]) == _strip(csv_items[:1])
    assert csv_items[1]["question"] == "Which is even, 3 or 4?" and csv_items[1]["gold"] == 1
    assert hf.items[0]["instruction"] == "The following are multiple choice questions (with answers) about elementary mathematics."
    context, _ = build_prompt(hf, 0, seed=0)
    # Both solved examples come from the dev split of the same subject.
    assert context.count("What is 1 + 1?") == 1 and context.count("What is 3 * 3?") == 1
    assert "largest planet" not in context
    hf.formulation = "mcf"
    context, item = build_prompt(hf, 1, seed=0)
    assert context.endswith("about astronomy.\n\nWhich planet is closest to the sun?\nA. Venus\nB. Earth\nC. Mercury\nD. Mars\nAnswer:")
    assert "The following are multiple choice questions (with answers) about astronomy.\n\nWhat is the largest planet?" in context
    assert item["choices"] == [" A", " B", " C", " D"] and item["gold"] == 2


def test_gsm8k_extracts_the_final_number_and_shows_worked_solutions_as_examples():
    task = load_adapter_task("gsm8k", FIXTURES / "gsm8k/main", num_fewshot=1)
    assert task.kind == "generative" and task.max_new_tokens == 256
    assert [i["answer"] for i in task.items] == ["7", "2400"]
    assert task.items[0]["extract"] == "last_number"
    assert [i["answer"] for i in _items("gsm8k", "gsm8k_original/test.jsonl")] == ["7", "2400"]
    context, _ = build_prompt(task, 0, seed=0)
    assert context == ("Question: What is 5 + 5?\nAnswer: 5 + 5 = <<5+5=10>>10\n#### 10\n\n"
                       "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:")


def test_adapter_specs_and_layout_errors(tmp_path):
    (task,) = resolve_tasks([f"arc_challenge={FIXTURES / 'arc/ARC-Easy'}"], limit=2)
    assert task.name == "arc_challenge" and len(task.items) == 2
    bad = tmp_path / "arc.jsonl"
    bad.write_text('{"id": "x", "question": "q?", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}\n')
    with pytest.raises(DataError, match=f"{bad}:1: answer 'C' is not one of the choice labels"):
        load_adapter_task("arc", bad)
    bad.write_text('{"goal": "x"}\n')
    with pytest.raises(DataError, match=f"{bad}:1: expected 'question' and 'choices'"):
        load_adapter_task("arc", bad)
    bad.write_text('{"goal": "x", "sol1": "a", "label": 0}\n')
    with pytest.raises(DataError, match=f"{bad}:1: not in the piqa layout"):
        load_adapter_task("piqa", bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no test files"):
        load_adapter_task("arc", tmp_path / "empty")
