"""Packed windows, shuffle, mixture, ranks, stages and resume, each against a brute-force reference."""

import json

import numpy as np
import pytest
import torch

from smoltrain.config import config_from_dict
from smoltrain.data import shards
from smoltrain.data.dataset import PackedDataset, batch_of_windows
from smoltrain.data.loader import build_train_loader, validation_batches
from smoltrain.data.mixture import MixtureSchedule
from smoltrain.data.permutation import KeyedPermutation
from smoltrain.data.shards import ShardWriter, TokenSource, shard_name, write_meta
from smoltrain.data.stages import stage_at
from smoltrain.errors import ConfigError, DataError
from smoltrain.model.attention import positions_from_documents

EOT = 0


def write_source(folder, documents, docs_per_shard=7, vocab_size=1000):
    """Documents (lists of token ids, EOT appended here) into several shards, as `data tokenize` would."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, first in enumerate(range(0, len(documents), docs_per_shard)):
        with ShardWriter(folder, shard_name("part", index), np.uint16) as writer:
            for doc in documents[first : first + docs_per_shard]:
                writer.add_document(list(doc) + [EOT])
            shards.append(writer.close())
    write_meta(folder, shards=shards, dtype=np.uint16, vocab_size=vocab_size, tokenizer_hash="test", eot_token_id=EOT)
    return str(folder)


def random_documents(rng, count, low, high, max_len=40):
    return [rng.integers(low, high, size=rng.integers(0, max_len)).tolist() for _ in range(count)]


def make_config(sources, seq_len=8, micro_batch_size=2, **data):
    return config_from_dict(
        {
            "model": {"vocab_size": 1000, "max_seq_len": 64},
            "data": {"sources": sources, "seq_len": seq_len, **data},
            "train": {"seed": 3, "micro_batch_size": micro_batch_size, "global_batch_tokens": micro_batch_size * seq_len},
        }
    )


def brute_force_windows(documents, seq_len):
    """Concatenate everything, cut windows of L+1 every L tokens, ids = document index - first one's."""
    stream, owner = [], []
    for d, doc in enumerate(documents):
        for t in list(doc) + [EOT]:
            stream.append(t)
            owner.append(d)
    out = []
    for start in range(0, len(stream) - seq_len, seq_len):
        window = stream[start : start + seq_len + 1]
        ids = [owner[start + p] - owner[start] for p in range(seq_len)]
        positions, run = [], 0
        for p in range(seq_len):
            run = 0 if p == 0 or ids[p] != ids[p - 1] else run + 1
            positions.append(run)
        out.append((window[:-1], window[1:], ids, positions))
    return out


def signature(batch):
    return [tuple(row) for row in batch["input_ids"].tolist()]


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_windows_documents_and_positions_match_brute_force(tmp_path, seq_len):
    rng = np.random.default_rng(0)
    documents = random_documents(rng, 60, 1, 1000)  # empty documents too: a lone end-of-text
    source = TokenSource(write_source(tmp_path / "a", documents))
    dataset = PackedDataset(source, seq_len)
    expected = brute_force_windows(documents, seq_len)
    assert len(dataset) == len(expected)
    batch = batch_of_windows(dataset, list(range(len(dataset))))
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["document_ids"].dtype == torch.int32
    positions = positions_from_documents(batch["document_ids"])
    for i, (inputs, labels, ids, pos) in enumerate(expected):
        assert batch["input_ids"][i].tolist() == inputs
        assert batch["labels"][i].tolist() == labels
        assert batch["document_ids"][i].tolist() == ids
        assert positions[i].tolist() == pos


@pytest.mark.parametrize("block", [4, 2048])
def test_windows_match_brute_force_with_thousands_of_tiny_documents(tmp_path, monkeypatch, block):
    """A 5,000-document shard of uneven lengths, windows holding dozens of documents. With 4-entry .idx
    blocks the interpolation guess mostly misses, so the binary search and multi-block reads run too."""
    monkeypatch.setattr(shards, "_BLOCK", block)
    rng = np.random.default_rng(9)
    documents = (random_documents(rng, 3000, 1, 1000, max_len=4) + random_documents(rng, 300, 1, 1000, max_len=60)
                 + random_documents(rng, 2500, 1, 1000, max_len=4))
    dataset = PackedDataset(TokenSource(write_source(tmp_path / "a", documents, docs_per_shard=5000)), 96)
    expected = brute_force_windows(documents, 96)
    batch = batch_of_windows(dataset, list(range(len(dataset))))
    assert max(ids[-1] for _, _, ids, _ in expected) > 40
    for i, (inputs, labels, ids, _) in enumerate(expected):
        assert batch["input_ids"][i].tolist() == inputs and batch["labels"][i].tolist() == labels
        assert batch["document_ids"][i].tolist() == ids
    # every offset: is a document starting one token later? (exercises the .idx search at every position)
    ends = set(np.cumsum([len(d) + 1 for d in documents]).tolist())
    source = dataset.source
    assert [len(source.document_starts(x, x + 2)) for x in range(source.num_tokens - 2)] == [
        int(x + 1 in ends) for x in range(source.num_tokens - 2)]


def test_validation_batches_are_the_first_windows_in_order(tmp_path):
    rng = np.random.default_rng(1)
    documents = random_documents(rng, 30, 1, 1000)
    folder = write_source(tmp_path / "v", documents)
    config = make_config({"a": folder}, seq_len=8, validation={"a": folder})
    expected = brute_force_windows(documents, 8)
    batches = list(validation_batches(config, "a", num_batches=3, batch_size=4))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4]
    rows = [r for b in batches for r in b["input_ids"].tolist()]
    assert rows == [e[0] for e in expected[:12]]
    everything = list(validation_batches(config, "a", num_batches=10**6, batch_size=5))
    assert sum(len(b["input_ids"]) for b in everything) == len(expected)  # stops when the split runs out


# ----------------------------------------------------------------------------- shuffle


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 1025])
def test_keyed_permutation_is_a_bijection_and_keys_differ(n):
    orders = [[KeyedPermutation(n, key)(i) for i in range(n)] for key in (11, 12)]
    for order in orders:
        assert sorted(order) == list(range(n))
    if n >= 17:
        assert orders[0] != orders[1]


def test_each_epoch_is_a_permutation_and_epochs_differ(tmp_path):
    rng = np.random.default_rng(2)
    folder = write_source(tmp_path / "a", random_documents(rng, 80, 1, 1000))
    loader = build_train_loader(make_config({"a": folder}, seq_len=8, micro_batch_size=1))
    n = loader.datasets["a"].num_sequences
    located = [loader.locate(g) for g in range(3 * n)]
    epochs = [[index for _, e, index in located if e == epoch] for epoch in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != sorted(epochs[0])  # actually shuffled, not document order
    # and the batches deliver exactly those windows
    dataset = PackedDataset(TokenSource(folder), 8)
    for g in range(n + 5):
        expected = batch_of_windows(dataset, [located[g][2]])["input_ids"]
        assert torch.equal(loader.next_batch()["input_ids"], expected)


# ----------------------------------------------------------------------------- mixture


@pytest.mark.parametrize("weights", [{"web": 0.7, "code": 0.2, "math": 0.1}, {"a": 1, "b": 1, "c": 1}, {"x": 0.95, "y": 0.049, "z": 0.001}])
def test_mixture_proportions_track_weights_at_every_point(weights):
    schedule = MixtureSchedule(weights)
    total = sum(weights.values())
    counts = dict.fromkeys(weights, 0)
    for n in range(5000):
        name, k = schedule.pick(n)
        assert k == counts[name]  # k is that source's running count
        counts[name] += 1
        assert counts == {**dict.fromkeys(weights, 0), **schedule.counts(n + 1)}
        for s, w in weights.items():
            assert abs(counts[s] - w / total * (n + 1)) < 1.5  # within ~a sequence, at every point
        if n + 1 == 1000:
            for s, w in weights.items():
                assert abs(counts[s] / 1000 - w / total) < 0.01


def test_loader_mixture_within_one_percent_after_1000_sequences(tmp_path):
    rng = np.random.default_rng(3)
    sources = {name: write_source(tmp_path / name, random_documents(rng, 20, 100 * i + 1, 100 * i + 100))
               for i, name in enumerate(["web", "code", "math"])}
    weights = {"web": 0.7, "code": 0.2, "math": 0.1}
    loader = build_train_loader(make_config(sources, seq_len=4, micro_batch_size=10, mixture=weights))
    seen = dict.fromkeys(weights, 0)
    for _ in range(100):
        for row in loader.next_batch()["labels"].tolist():
            token = next(t for t in row if t != EOT)  # each source has its own token range
            seen[["web", "code", "math"][(token - 1) // 100]] += 1
    for name, w in weights.items():
        assert abs(seen[name] / 1000 - w) < 0.01


# ----------------------------------------------------------------------------- ranks


def test_rank_slices_are_disjoint_and_complete(tmp_path):
    rng = np.random.default_rng(4)
    sources = {"a": write_source(tmp_path / "a", random_documents(rng, 40, 1, 500)),
               "b": write_source(tmp_path / "b", random_documents(rng, 40, 500, 1000))}
    world, micro = 3, 2
    single = build_train_loader(make_config(sources, micro_batch_size=world * micro, mixture={"a": 2, "b": 1}))
    ranks = [build_train_loader(make_config(sources, micro_batch_size=micro, mixture={"a": 2, "b": 1}), r, world)
             for r in range(world)]
    for _ in range(8):
        whole = single.next_batch()["input_ids"]
        parts = [r.next_batch()["input_ids"] for r in ranks]
        # rank r row j is global sequence r + world * j of the step
        rebuilt = torch.stack([parts[g % world][g // world] for g in range(world * micro)])
        assert torch.equal(rebuilt, whole)
    located = [tuple(r.locate(g)) for r in ranks for g in range(r.dp_rank, 48, world)]
    assert len(set(located)) == len(located) == 48


def test_state_saved_with_two_ranks_resumes_with_three(tmp_path):
    rng = np.random.default_rng(5)
    sources = {"a": write_source(tmp_path / "a", random_documents(rng, 40, 1, 1000))}
    reference = build_train_loader(make_config(sources, micro_batch_size=6))
    expected = [reference.next_batch()["input_ids"] for _ in range(5)]
    two = [build_train_loader(make_config(sources, micro_batch_size=3), r, 2) for r in range(2)]
    for _ in range(2):
        for loader in two:
            loader.next_batch()
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state == two[1].state_dict()
    three = [build_train_loader(make_config(sources, micro_batch_size=2), r, 3) for r in range(3)]
    for loader in three:
        loader.load_state_dict(state)
    for step in range(2, 5):
        parts = [loader.next_batch()["input_ids"] for loader in three]
        rebuilt = torch.stack([parts[g % 3][g // 3] for g in range(6)])
        assert torch.equal(rebuilt, expected[step])


# ----------------------------------------------------------------------------- resume and stages


STAGES = [
    {"name": "stable", "start_step": 0, "mixture": {"a": 0.8, "b": 0.2}},
    {"name": "anneal", "start_step": 5, "mixture": {"a": 0.3, "b": 0.7}},
    {"name": "long", "start_step": 9, "seq_len": 16},
]


def stage_sources(tmp_path):
    rng = np.random.default_rng(6)
    return {"a": write_source(tmp_path / "a", random_documents(rng, 50, 1, 500)),
            "b": write_source(tmp_path / "b", random_documents(rng, 50, 500, 1000))}


def run_steps(loader, config, first, last):
    out = []
    for step in range(first, last):
        loader.set_stage(stage_at(config.data, step))
        out.append(loader.next_batch())
    return out


@pytest.mark.parametrize("stop_at", [3, 5, 7, 9, 11])  # mid-stage, at each switch, after the length change
def test_resume_mid_epoch_and_across_stage_switches_matches_uninterrupted_run(tmp_path, stop_at):
    sources = stage_sources(tmp_path)
    config = make_config(sources, seq_len=8, micro_batch_size=3, stages=STAGES)
    uninterrupted = run_steps(build_train_loader(config), config, 0, 14)
    first = build_train_loader(config)
    run_steps(first, config, 0, stop_at)
    state = json.loads(json.dumps(first.state_dict()))
    assert all(isinstance(v, int) for k, v in state.items() if k != "base")
    resumed = build_train_loader(config)
    resumed.load_state_dict(state)
    for a, b in zip(uninterrupted[stop_at:], run_steps(resumed, config, stop_at, 14)):
        for key in ("input_ids", "labels", "document_ids"):
            assert torch.equal(a[key], b[key])
    assert uninterrupted[-1]["input_ids"].shape == (3, 16)  # the long-context stage changed seq_len
    assert uninterrupted[0]["input_ids"].shape == (3, 8)


def test_stage_switch_changes_mixture_and_sources_continue_their_epochs(tmp_path):
    sources = stage_sources(tmp_path)
    config = make_config(sources, seq_len=8, micro_batch_size=10, stages=STAGES[:2])
    loader = build_train_loader(config)
    first = [loader.locate(g) for g in range(10)]
    loader.next_batch()
    loader.set_stage(1)
    second = [loader.locate(g) for g in range(10, 20)]
    assert sum(name == "b" for name, _, _ in first) == 2 and sum(name == "b" for name, _, _ in second) == 7
    seen = [(n, e, i) for n, e, i in first + second]
    assert len(set(seen)) == len(seen)  # stage 2 does not replay what stage 1 read


def test_skip_advances_exactly_like_reading(tmp_path):
    sources = stage_sources(tmp_path)
    config = make_config(sources, micro_batch_size=2)
    a, b = build_train_loader(config), build_train_loader(config)
    for _ in range(7):
        a.next_batch()
    b.skip(7)
    assert a.state_dict() == b.state_dict()
    assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])


def test_stage_at_picks_the_last_started_stage():
    config = make_config({}, stages=STAGES)
    assert [stage_at(config.data, s) for s in (0, 4, 5, 8, 9, 10**6)] == [0, 0, 1, 1, 2, 2]
    assert stage_at(make_config({}).data, 100) == -1


# ----------------------------------------------------------------------------- bad data


def test_bad_shard_folders_are_named_in_one_line_errors(tmp_path):
    rng = np.random.default_rng(7)
    folder = write_source(tmp_path / "a", random_documents(rng, 10, 1, 1000))
    with pytest.raises(DataError, match="no such data folder"):
        TokenSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/meta.json: missing"):
        TokenSource(tmp_path / "empty")
    with open(f"{folder}/part_00000.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(DataError, match=r"part_00000.bin: 6 bytes"):
        TokenSource(folder)
    with pytest.raises(ConfigError, match="data.sources is empty"):
        build_train_loader(make_config({}))


def test_vocabulary_larger_than_the_model_is_refused(tmp_path):
    rng = np.random.default_rng(8)
    folder = write_source(tmp_path / "a", random_documents(rng, 10, 1, 1000), vocab_size=5000)
    with pytest.raises(ConfigError, match=r"model.vocab_size \(1000\).*data.sources.a \(5000\)"):
        build_train_loader(make_config({"a": folder}))
