"""SFT data prepared on disk: rows, masks and losses equal the in-memory path bit for bit, batched encoding
equals transformers' per-chat one, the cache is reused and keyed, nothing half-made survives, waiting ranks
read the first rank's folder, and mixture weights give each source its share."""

from __future__ import annotations

import bisect
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chat_helpers import VOCAB, chat_tokenizers, conversations

from smoltrain.config import ModelConfig, config_from_dict
from smoltrain.errors import ConfigError, DataError
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import Conversation, read_conversations
from smoltrain.post.chat.template import encode_chat, encode_chats, load_chat_tokenizer
from smoltrain.post.embedded import ensure_embedded_chat
from smoltrain.post.sft import prepare as sft_prepare
from smoltrain.post.sft.data import ChatCounts, PackedChatBatches, data_report, pack_best_fit, tokenize_conversations, trained_shares
from smoltrain.post.sft.prepare import Settings, load_prepared, named_files, prepare
from smoltrain.post.sft.stage import mixture_weights

SEQ = 96  # short rows: some embedded conversations are truncated, some dropped for lack of a target


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tok = chat_tokenizers(root) / "smollm3"
    return root, tok, ensure_embedded_chat(root / "cache", seed=0, count=300)


def prepared(root, tok, files, cache="cache", workers=2, **settings):
    settings = Settings(**{"seq_len": SEQ, "template": "smollm3", **settings})
    folder = prepare(named_files(files), tok, settings, root / cache, workers=workers, show_progress=False)
    return folder, *load_prepared(folder)


def bisect_best_fit(lengths, capacity):
    """The packer before the on-disk data (a sorted list of open rows): the reference for the fast one."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, room = [], []
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            free, row = capacity - lengths[i], len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


def test_fast_best_fit_packs_exactly_as_the_sorted_list_packer():
    r = np.random.default_rng(0)
    for capacity, n in ((16, 50), (96, 2000), (2048, 5000)):
        lengths = r.integers(1, capacity + 1, size=n).tolist()
        assert pack_best_fit(lengths, capacity).to_lists() == bisect_best_fit(lengths, capacity)


def test_batched_encoding_equals_apply_chat_template_chat_by_chat(data, one_thread):
    _, tok, _ = data
    chat = load_chat_tokenizer(tok)
    convs = conversations(60) + [
        Conversation([{"role": "user", "content": "Hi /no_think"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Again /think"}, {"role": "assistant", "content": "<think>\nx\n</think>\nHi."}],
                     {"custom_instructions": "Be brief.", "xml_tools": [{"name": "add"}]}),
        Conversation([{"role": "system", "content": "Only lower case. /no_think"}, {"role": "user", "content": "A?"},
                      {"role": "assistant", "content": "a."}]),
    ]
    got = encode_chats(chat, [(c.messages, c.kwargs) for c in convs])
    for conv, (ids, mask, _) in zip(convs, got):
        assert (ids.tolist(), mask.astype(int).tolist()) == tuple(map(list, encode_chat(chat, conv.messages, **conv.kwargs)))


def test_prepared_rows_masks_and_losses_equal_the_in_memory_path_bit_for_bit(data, one_thread):
    root, tok, files = data
    chat = load_chat_tokenizer(tok)
    convs = read_conversations(files).conversations
    examples, stats = tokenize_conversations(convs, chat, SEQ)
    assert stats.get("truncated") and stats.get("dropped_no_target")  # both overflow outcomes are exercised
    rows = pack_best_fit([len(e.ids) for e in examples], SEQ)
    _, disk, plan, report = prepared(root, tok, files, workers=2)
    assert plan.to_lists() == rows.to_lists()
    old, new = (PackedChatBatches(e, r, SEQ, 8, pad_id=0, seed=1) for e, r in ((examples, rows), (disk, plan)))
    model = build_model(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=SEQ, document_masking=True), seed=0)
    for step in range(len(rows) // 8 + 2):  # past the end of the first epoch: the reshuffle too
        a, b = old.next_batch(), new.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)
        if step < 2:
            with torch.no_grad():
                losses = [F.cross_entropy(model(x["input_ids"], document_ids=x["document_ids"]).flatten(0, 1),
                                          x["labels"].flatten(), ignore_index=-100) for x in (a, b)]
            assert losses[0].item() == losses[1].item()
    sources = sorted({e.source for e in examples})
    trained = trained_shares(sources, np.array([sources.index(e.source) for e in examples]), np.array([len(e.ids) for e in examples]),
                             np.array([int(e.targets.sum()) for e in examples]), np.arange(len(examples)))
    want = data_report(ChatCounts.of(convs, chat, {k: v for k, v in stats.items()}), trained, len(rows), SEQ, template="smollm3")
    for key in ("conversations", "by_source", "modes", "with_system_prompt", "custom_instructions", "truncated", "dropped",
                "examples", "tokens", "target_tokens", "tokens_by_source", "rows", "packing_efficiency", "rendered_examples"):
        assert report[key] == want[key], key


def test_the_cache_is_reused_and_a_changed_file_or_setting_is_prepared_again(data, tmp_path, monkeypatch, one_thread):
    root, tok, files = data
    folder, *_ = prepared(root, tok, files, cache=tmp_path, workers=1)
    with monkeypatch.context() as m:
        m.setattr(sft_prepare, "run_file_tasks", lambda *a, **k: pytest.fail("prepared again"))
        assert prepared(root, tok, files, cache=tmp_path)[0] == folder
    assert prepared(root, tok, files, cache=tmp_path, workers=1, loss="all")[0] != folder
    copy = tmp_path / "arithmetic.train.jsonl.gz"
    copy.write_bytes(open(files[0], "rb").read())
    first = prepared(root, tok, [str(copy)], cache=tmp_path, workers=1)[0]
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prepared(root, tok, [str(copy)], cache=tmp_path, workers=1)[0] != first


def test_an_interrupted_preparation_leaves_nothing_that_looks_finished(data, tmp_path, monkeypatch, one_thread):
    root, tok, files = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n{"messages": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: "):
        prepared(root, tok, [files[0], str(bad)], cache=tmp_path / "c", workers=2)
    with monkeypatch.context() as m:
        m.setattr(sft_prepare, "_write_plan", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            prepared(root, tok, files[:1], cache=tmp_path / "c", workers=1)
    assert list((tmp_path / "c" / "sft").iterdir()) == []  # no temp folder, no folder under a key


def test_a_waiting_rank_opens_the_folder_the_first_rank_prepared(data, tmp_path, monkeypatch, one_thread):
    root, tok, files = data
    got = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    waiter = threading.Thread(target=lambda: got.append(prepared(root, tok, files[:2], cache=tmp_path)[0]))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not got  # rank 1 prepares nothing: it waits
    monkeypatch.setenv("LOCAL_RANK", "0")
    folder = prepared(root, tok, files[:2], cache=tmp_path, workers=1)[0]
    waiter.join(timeout=30)
    assert got == [folder]


def test_mixture_weights_give_each_source_its_share_of_conversations_and_tokens(data, one_thread):
    root, tok, files = data
    weights = {"arithmetic": 0.5, "persona": 2.0}
    _, disk, plan, report = prepared(root, tok, files, workers=2, weights=weights)
    source = disk.example_source[plan.items]
    names = list(disk.sources)
    for k, name in enumerate(names):
        mine = np.flatnonzero(disk.example_source == k)
        picked = plan.items[source == k]
        assert len(picked) == round(weights.get(name, 1.0) * len(mine)), name
        assert set(picked) <= set(mine)
        if name == "persona":
            assert (np.bincount(picked - mine[0]) == 2).all()  # every persona conversation twice
        if name == "arithmetic":
            assert len(set(picked)) == len(picked)  # a half, no repeats
    lengths = disk.lengths[plan.items].astype(np.int64)
    for k, name in enumerate(names):
        shares = report["sources"][name]
        assert shares["conversation_share"] == pytest.approx((source == k).mean())
        assert shares["token_share"] == pytest.approx(lengths[source == k].sum() / lengths.sum())
        assert shares["weight"] == weights.get(name, 1.0)
    with pytest.raises(DataError, match="sft.mixture names chitchat"):
        prepared(root, tok, files, weights={"chitchat": 1.0})


def test_mixture_epochs_are_passes_over_the_whole_run_and_bad_entries_are_config_errors():
    config = config_from_dict({"sft": {"epochs": 2, "mixture": {"a": {"epochs": 3}, "b": {"weight": 0.25}}}})
    assert mixture_weights(config.sft) == {"a": 1.5, "b": 0.25}
    with pytest.raises(ConfigError, match="sft.mixture.a: set weight or epochs"):
        config_from_dict({"sft": {"mixture": {"a": {"epochs": 3, "weight": 1}}}})
    with pytest.raises(ConfigError, match="sft.mixture.a.epochs needs sft.epochs"):
        config_from_dict({"sft": {"epochs": None, "mixture": {"a": {"epochs": 3}}}})
    with pytest.raises(ConfigError, match="did you mean 'weight'"):
        config_from_dict({"sft": {"mixture": {"a": {"wieght": 3}}}})
