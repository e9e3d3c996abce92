"""Hugging Face dataset folders as data: `data tokenize --input`, `sft.data`, `dpo.train_data` / `eval_data` and
`grpo.prompts` read a `save_to_disk` folder (one Dataset or a DatasetDict) or a parquet snapshot
(data/<split>-00000-of-00001.parquet) by split, with the same result as the same rows in a jsonl file; a
split the folder lacks is a one-line error listing the ones it has."""

import json
from pathlib import Path

import numpy as np
import pytest
from chat_helpers import chat_tokenizers, conversations
from preference_helpers import WORDS, preference_rows, write_rows

from smoltrain import cli
from smoltrain.config import DataConfig
from smoltrain.data.shards import TokenSource
from smoltrain.errors import ConfigError, DataError
from smoltrain.post.chat.data import write_conversations
from smoltrain.post.preference.data import TextTokenizer, load_preferences
from smoltrain.post.preference.stage import DPOConfig, DPORunConfig
from smoltrain.post.rl.prompts import load_prompts
from smoltrain.post.rl.stage import GRPOConfig, GRPORunConfig, load_grpo_prompts
from smoltrain.post.sft.stage import SFTConfig, SFTRunConfig

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")


def save_dict(folder: Path, splits: dict[str, list[dict]]) -> Path:
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder


def save_snapshot(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """The layout of a dataset repository downloaded from the Hub: data/<split>-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    for name, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{name}-00000-of-00001.parquet")
    return folder


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shard_tokens(folder: Path) -> tuple[list[int], int]:
    """The whole token stream of a shard folder and its document count."""
    source = TokenSource(folder)
    tokens = np.empty(source.num_tokens, dtype=source.dtype)
    source.read(0, tokens)
    return tokens.tolist(), source.meta["num_documents"]


DOCS = {"train": [{"text": f"document {i}: the quick brown fox {i * 7}"} for i in range(6)],
        "test": [{"text": "held out text, 42"}, {"text": "another held out one"}]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer([r["text"] for rows in DOCS.values() for r in rows] * 10, 300, show_progress=False), folder)
    return folder / "tokenizer.json"


@pytest.mark.parametrize("layout", [save_dict, save_snapshot])
def test_data_tokenize_reads_a_split_of_a_dataset_folder_as_the_same_rows_in_jsonl(tmp_path, tokenizer, layout):
    folder = layout(tmp_path / "ds", DOCS)
    common = ["data", "tokenize", "--tokenizer", str(tokenizer), "--workers", "1"]
    assert cli.main([*common, "--input", str(folder), "--split", "test", "--out", str(tmp_path / "from_ds")]) == 0
    assert cli.main([*common, "--input", str(jsonl(tmp_path / "t.jsonl", DOCS["test"])), "--out", str(tmp_path / "from_jsonl")]) == 0
    assert shard_tokens(tmp_path / "from_ds") == shard_tokens(tmp_path / "from_jsonl")
    # No --split: 'train' of a folder with several splits.
    assert cli.main([*common, "--input", str(folder), "--out", str(tmp_path / "train")]) == 0
    assert shard_tokens(tmp_path / "train")[1] == len(DOCS["train"])


def test_one_saved_dataset_is_its_only_split_and_a_missing_split_lists_the_ones_there_are(tmp_path, tokenizer, capsys):
    datasets.Dataset.from_list(DOCS["test"]).save_to_disk(str(tmp_path / "one"))
    common = ["data", "tokenize", "--tokenizer", str(tokenizer), "--workers", "1"]
    assert cli.main([*common, "--input", str(tmp_path / "one"), "--out", str(tmp_path / "a")]) == 0
    assert shard_tokens(tmp_path / "a")[1] == 2
    save_dict(tmp_path / "ds", DOCS)
    capsys.readouterr()  # the progress bars of saving
    assert cli.main([*common, "--input", str(tmp_path / "ds"), "--split", "validation", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no split 'validation' (splits: train, test;" in err[0]


def test_sft_data_takes_a_dataset_folder_split(tmp_path):
    from smoltrain.post.sft.stage import prepare_sft_data

    root = chat_tokenizers(tmp_path)
    rows = [c.to_row() for c in conversations(12)]
    save_snapshot(tmp_path / "chat", {"train": rows[:8], "test": rows[8:]})
    write_conversations(tmp_path / "test.jsonl", rows[8:])

    def prepared(data: str, split: str | None):
        config = SFTRunConfig(data=DataConfig(seq_len=128), sft=SFTConfig(data=[data], split=split))
        return prepare_sft_data(config, root / "smollm3")

    from_folder, from_jsonl = prepared(str(tmp_path / "chat"), "test"), prepared(str(tmp_path / "test.jsonl"), None)
    assert [list(e.ids) for e in from_folder.examples] == [list(e.ids) for e in from_jsonl.examples]
    assert len(from_folder.examples) == 4
    assert from_folder.rows.to_lists() == from_jsonl.rows.to_lists()
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test"):
        prepared(str(tmp_path / "chat"), "dev")


def test_dpo_train_and_eval_data_take_dataset_folder_splits(tmp_path):
    from tokenizers import Tokenizer

    from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
    from smoltrain.post.preference.stage import split_data

    save_tokenizer(train_tokenizer([" ".join(WORDS) + " say:"] * 40, 300, False), tmp_path / "tok")
    tok = TextTokenizer(Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")), "<|endoftext|>")
    rows = preference_rows(10)
    folder = str(save_dict(tmp_path / "pairs", {"train": rows[:7], "test": rows[7:]}))
    tokenizer_path = str(tmp_path / "tok" / "tokenizer.json")
    data = DataConfig(cache_dir=str(tmp_path / "cache"))  # dpo prepares its pairs on disk, cached
    train, held_out = split_data(DPORunConfig(data=data, dpo=DPOConfig(train_data=[folder], eval_data=[folder], eval_split="test")),
                                 tokenizer_path)
    assert list(train) == load_preferences([write_rows(tmp_path / "train.jsonl", rows[:7])], tok).pairs and len(train) == 7
    assert list(held_out) == load_preferences([write_rows(tmp_path / "test.jsonl", rows[7:])], tok).pairs and len(held_out) == 3
    assert load_preferences([folder], tok, split="train").sources[0] == f"{folder}:1"
    with pytest.raises(DataError, match="no split 'validation'"):
        split_data(DPORunConfig(data=data, dpo=DPOConfig(train_data=[folder], split="validation")), tokenizer_path)


def test_grpo_prompts_take_a_dataset_folder_with_its_held_out_split(tmp_path):
    rows = [{"prompt": f"{i} + {i} =", "answer": str(2 * i), "topic": "sum"} for i in range(6)]
    folder = save_snapshot(tmp_path / "prompts", {"train": rows[:4], "test": rows[4:]})
    config = GRPORunConfig(grpo=GRPOConfig(prompts=str(folder), split="train", eval_split="test", num_prompts=0, eval_count=0))
    train, heldout = load_grpo_prompts(config)
    assert train == load_prompts(str(jsonl(tmp_path / "train.jsonl", rows[:4])))
    assert heldout == load_prompts(str(jsonl(tmp_path / "test.jsonl", rows[4:])))
    with pytest.raises(ConfigError, match="grpo.eval_split"):
        load_grpo_prompts(GRPORunConfig(grpo=GRPOConfig(prompts=str(folder))))
