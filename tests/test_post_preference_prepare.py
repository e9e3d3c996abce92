"""Preference pairs prepared on disk: equal to the in-memory tokenization pair for pair, skipped rows
counted alike, cached by inputs and settings, and dpo's held-out split the same draw as before."""

import json
import os
import time

import pytest
import torch
from preference_helpers import preference_rows, save_init_model, write_rows

from smoltrain.config import config_from_dict
from smoltrain.errors import DataError
from smoltrain.post.preference import prepare as preference_prepare
from smoltrain.post.preference.data import TextTokenizer, chat_render, load_preferences
from smoltrain.post.preference.prepare import PairShards, load_pairs, prepare_pairs
from smoltrain.post.preference.stage import split_data


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    save_init_model(root, "init")
    rows = preference_rows(40, 3)
    rows[5] = {"prompt": "say red:", "chosen": " red", "rejected": " red"}  # identical: skipped
    rows[9] = {"prompt": "say red:"}  # missing keys: skipped
    write_rows(root / "a.jsonl", rows[:25])
    write_rows(root / "b.jsonl", rows[25:])
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in preference_rows(10, 4)]
    write_rows(root / "chat.jsonl", conversational)
    return root


def test_prepared_pairs_equal_the_in_memory_tokenization(root, tmp_path):
    tok = root / "init"
    for files, template in (([root / "a.jsonl", root / "b.jsonl"], None), ([root / "chat.jsonl"], "chatml")):
        want = load_preferences(files, TextTokenizer.load(tok), 64, skip_bad=True, render=chat_render(tok, template))
        got = load_pairs(files, tok, template, 64, True, tmp_path)
        assert len(got) == len(want.pairs) and [got[i] for i in range(len(got))] == want.pairs
        assert got[3:7] == want.pairs[3:7] and got.skipped == want.skipped
    assert got.skipped == {} and load_pairs([root / "a.jsonl"], tok, None, 64, True, tmp_path).skipped == {
        "identical": 1, "missing_key": 1}
    with pytest.raises(DataError, match=r"a.jsonl:6: chosen and rejected are identical"):
        load_pairs([root / "a.jsonl"], tok, None, 64, False, tmp_path)


def test_two_worker_processes_write_the_folder_one_process_writes_byte_for_byte(root, tmp_path):
    tok, files = root / "init", [root / "a.jsonl", root / "chat.jsonl", root / "b.jsonl"]
    one, two = (prepare_pairs(files, tok, "chatml", 64, True, tmp_path / str(n), workers=n) for n in (1, 2))
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for path in one.iterdir():
        if path.name == "meta.json":  # equal but for the time it was written
            assert {**json.loads(path.read_text()), "created": 0} == {**json.loads((two / path.name).read_text()), "created": 0}
        else:
            assert path.read_bytes() == (two / path.name).read_bytes(), path.name
    assert PairShards(two).skipped == {"identical": 1, "missing_key": 1}
    with pytest.raises(DataError, match=r"a.jsonl:6: chosen and rejected are identical"):  # raised in a worker, re-raised here
        prepare_pairs(files, tok, "chatml", 64, False, tmp_path / "bad", workers=2)
    assert not any((tmp_path / "bad" / "preference").iterdir())  # nothing that looks finished, no temporary folder


def test_the_cache_is_reused_until_an_input_or_setting_changes(root, tmp_path, monkeypatch):
    tok, files = root / "init", [root / "b.jsonl"]
    first = prepare_pairs(files, tok, None, 64, False, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(preference_prepare, "_write", lambda *a: pytest.fail("prepared again"))
        assert prepare_pairs(files, tok, None, 64, False, tmp_path) == first
    assert prepare_pairs(files, tok, None, 32, False, tmp_path) != first
    copy = tmp_path / "copy.jsonl"
    copy.write_text((root / "b.jsonl").read_text())
    before = prepare_pairs([copy], tok, None, 64, False, tmp_path)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prepare_pairs([copy], tok, None, 64, False, tmp_path) != before
    assert sorted(p.name for p in (tmp_path / "preference").iterdir() if p.name.startswith(".")) == []  # no leftovers
    assert json.loads((first / "meta.json").read_text())["num_documents"] == len(PairShards(first))


def test_the_held_out_split_is_the_same_seeded_draw_as_the_in_memory_one(root, tmp_path):
    config = config_from_dict({"data": {"cache_dir": str(tmp_path)}, "train": {"seed": 7},
                               "dpo": {"train_data": [str(root / "b.jsonl")], "holdout_pairs": 4, "max_length": 64}})
    train, held = split_data(config, str(root / "init"))
    pairs = load_preferences([root / "b.jsonl"], TextTokenizer.load(root / "init"), 64).pairs
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(7)).tolist()
    out = set(order[:4])
    assert [train[i] for i in range(len(train))] == [p for i, p in enumerate(pairs) if i not in out]
    assert [held[i] for i in range(len(held))] == [pairs[i] for i in sorted(out)] and held[1:3] == [pairs[i] for i in sorted(out)][1:3]
