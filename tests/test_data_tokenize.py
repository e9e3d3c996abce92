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


# ----------------------------------------------------------------------------- edge cases (issue 18)


def _data_files(out):
    """Files a reader could take for data: shards and meta.json outside hidden folders."""
    return sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".idx", ".json") and not p.name.startswith("."))


def test_an_empty_file_is_a_counted_skip_with_skip_bad(tok_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "first document"}) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("")
    (tmp_path / "in" / "c.jsonl").write_text(json.dumps({"text": "third document"}) + "\n")
    out = tmp_path / "out"
    argv = ["data", "tokenize", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "in" / "*.jsonl"), "--out", str(out)]
    assert main(argv + ["--skip-bad"]) == 0
    assert "skipped 1 bad records (empty_file: 1)" in capsys.readouterr().out
    meta, shards = shard_documents(out)
    tok = load_tokenizer(tok_dir)
    assert [s["name"] for s in meta["shards"]] == ["out_00000", "out_00002"]
    assert shards == [[tok.encode("first document").ids + [0]], [tok.encode("third document").ids + [0]]]
    assert _data_files(out) == ["meta.json", "out_00000.bin", "out_00000.idx", "out_00002.bin", "out_00002.idx"]


def test_an_aborted_job_leaves_nothing_that_looks_like_data_and_the_rerun_reuses_its_work(tok_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "a good document"}) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("{broken\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="b.jsonl:1: not valid JSON"):
        tokenize(str(tok_dir), [str(tmp_path / "in" / "*.jsonl")], out, workers=1, show_progress=False)
    assert _data_files(out) == []  # the finished shard of a.jsonl waits in a hidden staging folder
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": "fixed"}) + "\n")
    meta = tokenize(str(tok_dir), [str(tmp_path / "in" / "*.jsonl")], out, workers=1, show_progress=False)
    assert meta["tokenized_files"] == 1 and meta["num_documents"] == 2
    # A complete folder stays complete (old meta.json, old shards) when a later job on it aborts.
    (tmp_path / "in" / "a.jsonl").write_text("{broken again\n")
    with pytest.raises(DataError):
        tokenize(str(tok_dir), [str(tmp_path / "in" / "*.jsonl")], out, workers=1, show_progress=False)
    again, _ = shard_documents(out)
    assert again["num_documents"] == 2 and _data_files(out) == ["meta.json", "out_00000.bin", "out_00000.idx",
                                                                 "out_00001.bin", "out_00001.idx"]


def test_a_json_list_is_read_as_records_and_other_json_is_refused(tok_dir, tmp_path):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=2))
    tokenize(str(tok_dir), [str(tmp_path / "list.json")], tmp_path / "out", show_progress=False)
    tok = load_tokenizer(tok_dir)
    _, shards = shard_documents(tmp_path / "out")
    assert shards == [[tok.encode(t).ids + [0] for t in TEXTS]]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=r"lines.json:2: one JSON object per line; name the file .jsonl"):
        tokenize(str(tok_dir), [str(tmp_path / "lines.json")], tmp_path / "out2", show_progress=False)
    (tmp_path / "number.json").write_text("7")
    with pytest.raises(DataError, match=r"number.json: expected a JSON list of records"):
        tokenize(str(tok_dir), [str(tmp_path / "number.json")], tmp_path / "out3", show_progress=False)


def test_a_truncated_jsonl_gz_keeps_the_records_before_the_damage_with_skip_bad(tok_dir, tmp_path):
    import zlib

    lines = [json.dumps({"text": f"record number {i} " + TEXTS[i % 4]}) + "\n" for i in range(400)]
    whole = gzip.compress("".join(lines).encode())
    cut = whole[: len(whole) // 2]
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    # What survives, by hand: decompress what is there, keep the complete lines.
    readable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut).decode()
    kept = [json.loads(line)["text"] for line in readable.split("\n")[:-1]]
    assert 0 < len(kept) < len(lines)
    with pytest.raises(DataError, match="unreadable gzip data.*--skip-bad keeps"):
        tokenize(str(tok_dir), [str(tmp_path / "cut.jsonl.gz")], tmp_path / "out", show_progress=False)
    meta = tokenize(str(tok_dir), [str(tmp_path / "cut.jsonl.gz")], tmp_path / "out", skip_bad=True, show_progress=False)
    tok = load_tokenizer(tok_dir)
    _, shards = shard_documents(tmp_path / "out")
    assert shards == [[tok.encode(t).ids + [0] for t in kept]]
    assert meta["skipped_records"] == {"truncated_gzip": 1}


def test_very_long_documents_are_encoded_in_pieces_with_the_same_ids(tok_dir, tmp_path, monkeypatch):
    from smoltrain.data import tokenize_shards

    long_text = " ".join(TEXTS) * 40 + "x" * 300  # word boundaries, then a run with none
    pieces = tokenize_shards.split_long(long_text, 64)
    assert "".join(pieces) == long_text and max(map(len, pieces)) <= 64 and len(pieces) > 50
    monkeypatch.setattr(tokenize_shards, "MAX_PIECE_CHARS", 64)
    (tmp_path / "long.txt").write_text(" ".join(TEXTS) * 40)
    tokenize(str(tok_dir), [str(tmp_path / "long.txt")], tmp_path / "out", workers=1, show_progress=False)
    _, shards = shard_documents(tmp_path / "out")
    assert shards == [[load_tokenizer(tok_dir).encode(" ".join(TEXTS) * 40).ids + [0]]]


def test_progress_rates_are_averages_since_the_start():
    from smoltrain.data.tokenize_shards import progress_rates

    # 1.7 MB and 0.5M tokens in 2 s, however the updates were spaced.
    assert progress_rates(1_700_000, 500_000, 2.0) == "0.85 MB/s 0.25M tok/s"
