"""The embedded corpus and its cached build: deterministic, correct math, race-safe, usable by the loader."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smoltrain.config import config_from_dict
from smoltrain.data.corpus import build_corpus, math_problem
from smoltrain.data.embedded import ensure_embedded_data
from smoltrain.data.loader import build_train_loader, validation_batches
from smoltrain.data.tokenizer import load_tokenizer

FRACTION = 0.03


def read_texts(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    raw = {"data": {"embedded": True, "embedded_fraction": FRACTION, "cache_dir": str(cache), "seq_len": 32},
           "model": {"vocab_size": 4096, "max_seq_len": 64},
           "train": {"micro_batch_size": 4, "global_batch_tokens": 128}}
    config = config_from_dict(raw)
    return config, ensure_embedded_data(config.data), cache


def test_corpus_is_deterministic_split_by_document_and_seeded(tmp_path):
    a = build_corpus(tmp_path / "a", seed=1, fraction=FRACTION)
    b = build_corpus(tmp_path / "b", seed=1, fraction=FRACTION)
    build_corpus(tmp_path / "c", seed=2, fraction=FRACTION)
    assert a["files"] == b["files"]
    for name in a["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert read_texts(tmp_path / "a" / "math.train.jsonl.gz") != read_texts(tmp_path / "c" / "math.train.jsonl.gz")
    for source in ("prose", "code", "math"):
        train = set(read_texts(tmp_path / "a" / f"{source}.train.jsonl.gz"))
        validation = set(read_texts(tmp_path / "a" / f"{source}.validation.jsonl.gz"))
        assert train and not train & validation
    assert any("def " in t for t in read_texts(tmp_path / "a" / "code.train.jsonl.gz"))


def test_math_solutions_are_arithmetically_correct():
    """Every `expression = value` in the worked solutions, recomputed by Python."""
    import random

    r = random.Random(0)
    checked = 0
    for _ in range(2000):
        text = math_problem(r)
        for line in text.replace("$", "").splitlines():
            parts = line.split(" = ")
            for left, right in zip(parts, parts[1:]):
                expr = re.search(r"[\d()+\-*/. ]+$", left).group().strip()
                value = re.match(r"-?\d+(\.\d+)?(?![\d ]*[-+*/])", right)
                if value is None or not re.search(r"[-+*/]", expr):
                    continue
                assert abs(eval(expr) - float(value.group())) < 0.006, line
                checked += 1
        assert re.fullmatch(r"-?\d+|\$\d+(\.\d\d)?", text.rsplit("#### ", 1)[1]), text
    assert checked > 4000


def test_embedded_build_points_the_config_at_tokenizer_and_shards(embedded):
    config, data, cache = embedded
    assert set(data.sources) == set(data.validation) == {"prose", "code", "math"}
    tok = load_tokenizer(data.tokenizer)
    loader = build_train_loader(config)
    batch = loader.next_batch()
    assert batch["input_ids"].shape == (4, 32)
    assert int(batch["input_ids"].max()) < tok.get_vocab_size()
    text = tok.decode(batch["input_ids"][0].tolist())
    assert len(text) > 32  # real text, several characters per token
    val = list(validation_batches(config, "math", num_batches=2, batch_size=3))
    assert [b["input_ids"].shape for b in val] == [(3, 32), (3, 32)]
    assert "Question:" in tok.decode(val[0]["input_ids"].flatten().tolist()) + tok.decode(val[1]["input_ids"].flatten().tolist())


def test_second_call_reuses_the_cache(embedded):
    config, data, cache = embedded
    manifests = list(Path(cache).glob("embedded-*/manifest.json"))
    assert len(manifests) == 1
    before = manifests[0].stat().st_mtime_ns
    again = ensure_embedded_data(config.data)
    assert again == data and manifests[0].stat().st_mtime_ns == before
    assert not list(Path(cache).glob(".*.tmp"))


@pytest.mark.slow
def test_two_processes_racing_to_build_both_get_one_complete_copy(tmp_path):
    code = (
        "import sys; from smoltrain.config import DataConfig; from smoltrain.data.embedded import ensure_embedded_data;"
        f"d = ensure_embedded_data(DataConfig(embedded=True, embedded_fraction=0.01, cache_dir={str(tmp_path)!r}));"
        "print(d.tokenizer)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(outputs[0]).parent.name]  # no temp folder left
    assert (Path(outputs[0]).parent / "manifest.json").is_file()
