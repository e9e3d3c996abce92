"""Tokenizer training and loading, tokenization into shards, and every bad-input case."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smoltrain.cli import main
from smoltrain.data.shards import TokenSource
from smoltrain.data.tokenize_shards import tokenize
from smoltrain.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    measure,
    save_tokenizer,
    special_token_id,
    tokenizer_report,
    train_tokenizer,
)
from smoltrain.errors import DataError

TEXTS = [
    "The quick brown fox jumps over the lazy dog 1234567 times.",
    "def add(a, b):\n    return a + b\n",
    "Question: 12 * 34 = ?\nAnswer: 12 * 34 = 408\n#### 408",
    "Ünïcödé text — with dashes, émojis 🙂 and 中文 too.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = [t * 3 for t in TEXTS] * 20
    save_tokenizer(train_tokenizer(corpus, vocab_size=400, show_progress=False), out)
    return out


def write_inputs(folder, docs):
    """The same documents spread over the four input formats."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:3])) + "\n")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in docs[3:6]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": docs[6:9], "n": list(range(3))}), folder / "c.parquet", row_group_size=2)
    (folder / "d.txt").write_text(docs[9])
    return [docs[:3], docs[3:6], docs[6:9], [docs[9]]]


def shard_documents(folder):
    """Split each shard's tokens at its .idx ends (read with numpy directly): one list of documents per shard."""
    meta = TokenSource(folder).meta  # also checks the folder as the loader will
    docs = []
    for entry in meta["shards"]:
        tokens = np.fromfile(f"{folder}/{entry['name']}.bin", dtype=meta["dtype"])
        ends = np.fromfile(f"{folder}/{entry['name']}.idx", dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        docs.append([tokens[a:b].tolist() for a, b in zip(starts, ends)])
    return meta, docs


# ----------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_loads_in_transformers_with_the_same_ids(tok_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text  # byte-level: lossless for any Unicode
    assert [ours.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert hf.eos_token == "<|endoftext|>"
    chat = ours.encode("<|im_start|>user\nhi<|im_end|><think></think>", add_special_tokens=False).ids
    assert [i for i in chat if i < len(SPECIAL_TOKENS)] == [1, 2, 3, 4]  # special tokens never split


def test_digits_are_split_in_groups_of_at_most_three(tok_dir):
    tok = load_tokenizer(tok_dir)
    pieces = tok.encode("1234567", add_special_tokens=False).tokens
    assert "".join(pieces) == "1234567" and max(len(p) for p in pieces) <= 3


def test_load_tokenizer_errors_name_the_path(tmp_path, tok_dir):
    with pytest.raises(DataError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json: not a tokenizers JSON file"):
        load_tokenizer(bad)
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    assert special_token_id(tok, "eos") == 0 and special_token_id(tok, "<|im_end|>") == 2
    with pytest.raises(DataError, match="no bos token"):
        special_token_id(tok, "bos")


def test_report_measures_match_a_direct_count(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    m = measure(tok, TEXTS)
    words = [w for t in TEXTS for w in t.split()]
    tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in TEXTS)
    split = sum(len(tok.encode(" " + w, add_special_tokens=False).ids) > 1 for w in words)
    assert m["fertility"] == pytest.approx(tokens / len(words))
    assert m["split_word_share"] == pytest.approx(split / len(words))
    assert m["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in TEXTS) / tokens)
    # a byte-level tokenizer with no merges spends one token per byte
    bytes_only = tmp_path / "bytes"
    save_tokenizer(train_tokenizer(["ab"], vocab_size=300, show_progress=False), bytes_only)
    (tmp_path / "prose.train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    report = tokenizer_report([str(tok_dir), str(bytes_only)], [str(tmp_path / "prose.train.jsonl")])
    small = report["tokenizers"][str(bytes_only)]["sources"]["prose"]
    assert small["bytes_per_token"] == pytest.approx(1.0, abs=0.02)
    assert report["tokenizers"][str(tok_dir)]["sources"]["prose"]["fertility"] < small["fertility"]


# ----------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_hold_each_document_encoded_then_end_of_text(tok_dir, tmp_path, workers):
    docs = [TEXTS[i % 4] + f" number {i}" for i in range(10)]
    expected_files = write_inputs(tmp_path / "in", docs)
    meta = tokenize(str(tok_dir), [str(tmp_path / "in" / "*")], tmp_path / "out", workers=workers, show_progress=False)
    tok = load_tokenizer(tok_dir)
    _, shards = shard_documents(tmp_path / "out")
    assert len(shards) == 4
    for texts, documents in zip(expected_files, shards):
        assert documents == [tok.encode(t, add_special_tokens=False).ids + [0] for t in texts]
    assert meta["num_documents"] == 10 and meta["dtype"] == "uint16"
    assert meta["num_bytes"] == sum(len(d.encode()) for d in docs)
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temp files or markers left


def test_rerun_skips_finished_shards_and_redoes_changed_inputs(tok_dir, tmp_path):
    write_inputs(tmp_path / "in", [f"document {i} " + TEXTS[i % 4] for i in range(10)])
    out = tmp_path / "out"
    tokenize(str(tok_dir), [str(tmp_path / "in" / "*")], out, workers=1, show_progress=False)
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out) if p.endswith(".bin")}
    again = tokenize(str(tok_dir), [str(tmp_path / "in" / "*")], out, workers=1, show_progress=False)
    assert again["tokenized_files"] == 0
    (tmp_path / "in" / "d.txt").write_text("a changed document")
    third = tokenize(str(tok_dir), [str(tmp_path / "in" / "*")], out, workers=1, show_progress=False)
    assert third["tokenized_files"] == 1
    assert {p: os.stat(out / p).st_mtime_ns for p in mtimes if p != "out_00003.bin"} == {
        p: t for p, t in mtimes.items() if p != "out_00003.bin"}
    _, shards = shard_documents(out)
    assert shards[3] == [load_tokenizer(tok_dir).encode("a changed document").ids + [0]]


def test_add_bos_starts_every_document(tmp_path):
    tok = train_tokenizer(TEXTS * 5, vocab_size=300, show_progress=False)
    tok.add_special_tokens(["<|begin_of_text|>"])
    save_tokenizer(tok, tmp_path / "tok")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tokenize(str(tmp_path / "tok"), [str(tmp_path / "x.jsonl")], tmp_path / "out", add_bos=True, show_progress=False)
    bos = tok.token_to_id("<|begin_of_text|>")
    _, shards = shard_documents(tmp_path / "out")
    assert [d[0] for d in shards[0]] == [bos] * len(TEXTS) and [d[-1] for d in shards[0]] == [0] * len(TEXTS)


BAD_CASES = {
    "not_json": (b'{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n', r"bad.jsonl:3: not valid JSON"),
    "missing_key": (b'{"text": "fine"}\n{"body": "x"}\n', r"bad.jsonl:2: no 'text' key \(keys: body"),
    "not_string": (b'{"text": 7}\n', r"bad.jsonl:1: 'text' is int, not a string"),
    "invalid_utf8": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad.jsonl:2: invalid UTF-8"),
    "empty_text": (b'{"text": "fine"}\n{"text": ""}\n', r"bad.jsonl:2: empty 'text'"),
    "empty_input": (b"", r"bad.jsonl: no documents"),
    "not_object": (b'["text"]\n', r"bad.jsonl:1: expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_naming_file_and_line_and_leaves_nothing(tok_dir, tmp_path, capsys, case):
    content, pattern = BAD_CASES[case]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_good.jsonl").write_text(json.dumps({"text": "a good document"}) + "\n")
    (tmp_path / "in" / "bad.jsonl").write_bytes(content)
    out = tmp_path / "out"
    argv = ["data", "tokenize", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "in" / "*.jsonl"),
            "--out", str(out), "--workers", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("smoltrain data: error:")
    import re

    assert re.search(pattern, err), err
    assert not (out / "meta.json").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") or p.startswith("out_00001")]


def test_skip_bad_skips_and_counts_each_kind(tok_dir, tmp_path, capsys):
    lines = [b'{"text": "good one"}', b"{broken", b'{"body": 1}', b'{"text": "caf\xe9"}', b'{"text": ""}',
             b'{"text": "good two"}']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    argv = ["data", "tokenize", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "bad.jsonl"),
            "--out", str(out), "--skip-bad"]
    assert main(argv) == 0
    assert "skipped 4 bad records" in capsys.readouterr().out
    meta, shards = shard_documents(out)
    assert meta["skipped_records"] == {"not_json": 1, "missing_key": 1, "invalid_utf8": 1, "empty": 1}
    tok = load_tokenizer(tok_dir)
    assert shards[0] == [tok.encode(t).ids + [0] for t in ("good one", "good two")]


def test_parquet_without_the_text_column_and_unmatched_globs_are_errors(tok_dir, tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: content"):
        tokenize(str(tok_dir), [str(tmp_path / "p.parquet")], tmp_path / "out", show_progress=False)
    tokenize(str(tok_dir), [str(tmp_path / "p.parquet")], tmp_path / "out2", text_key="content", show_progress=False)
    with pytest.raises(DataError, match="nothing-here/\\*.jsonl: no input file matches"):
        tokenize(str(tok_dir), [str(tmp_path / "nothing-here" / "*.jsonl")], tmp_path / "out3", show_progress=False)
