"""SFT data: best-fit packing against a brute-force optimum, labels, document isolation, the data check."""

import itertools
import random

import numpy as np
import pytest
import torch
from chat_helpers import VOCAB, chat_tokenizers, conversations

from smoltrain.config import ModelConfig
from smoltrain.errors import DataError
from smoltrain.model.transformer import build_model
from smoltrain.post.chat.data import Conversation
from smoltrain.post.chat.template import (
    encode_chat,
    load_chat_tokenizer,
)
from smoltrain.post.sft.data import (
    ChatCounts,
    PackedChatBatches,
    data_report,
    pack_best_fit,
    report_markdown,
    tokenize_conversations,
    trained_shares,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return chat_tokenizers(tmp_path_factory.mktemp("tok"))


def optimum_bins(lengths, capacity):
    """Fewest rows by brute force: try every assignment of items to k rows, smallest k first."""
    for k in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(k), repeat=len(lengths)):
            if assignment and assignment[0] != 0:  # symmetry: the first item goes to row 0
                continue
            load = [0] * k
            for item, row in zip(lengths, assignment):
                load[row] += item
            if max(load) <= capacity:
                return k
    return len(lengths)


def test_best_fit_decreasing_is_near_the_brute_force_optimum_and_never_splits():
    r = random.Random(0)
    equal = 0
    for _ in range(60):
        capacity = r.randint(8, 20)
        lengths = [r.randint(1, capacity) for _ in range(r.randint(1, 7))]
        rows = pack_best_fit(lengths, capacity).to_lists()
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each once, whole
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        best = optimum_bins(lengths, capacity)
        assert best <= len(rows) <= 11 / 9 * best + 6 / 9  # the proven best-fit-decreasing bound
        equal += len(rows) == best
    assert equal >= 55  # on small cases it is almost always optimal


def test_best_fit_puts_each_item_in_the_tightest_row():
    # rows [8] (2 free) and [5, 4] (1 free): first fit would put the 1 with the 8, best fit with 5 + 4
    assert pack_best_fit([8, 5, 4, 1], 10).to_lists() == [[0], [1, 2, 3]]


def test_labels_are_the_next_tokens_inside_the_generation_mask(tok, one_thread):
    chat = load_chat_tokenizer(tok / "smollm3")
    convs = conversations(40)
    examples, stats = tokenize_conversations(convs, chat, seq_len=512)
    assert "truncated" not in stats
    rows = pack_best_fit([len(e.ids) for e in examples], 512)
    batches = PackedChatBatches(examples, rows, 512, micro_batch_size=len(rows), pad_id=0, seed=3)
    batch = batches.next_batch()
    seen = 0
    for b in range(len(rows)):
        docs = batch["document_ids"][b]
        for doc in range(int(docs.max()) + 1):
            where = (docs == doc).nonzero().flatten()
            ids = batch["input_ids"][b, where].tolist()
            row = batches._row_at(b)  # the batch's rows come in the epoch's shuffled order
            example = examples[row[doc]] if doc < len(row) else None
            if example is None:  # the padding document
                assert (batch["labels"][b, where] == -100).all()
                continue
            seen += 1
            assert example.ids.tolist() == ids
            conv = convs[example.index]
            ref_ids, mask = encode_chat(chat, conv.messages, **conv.kwargs)
            expected = [ref_ids[j + 1] if mask[j + 1] else -100 for j in range(len(ref_ids) - 1)] + [-100]
            assert batch["labels"][b, where].tolist() == expected
    assert seen == len(examples)


def test_perturbing_one_packed_conversation_leaves_the_others_logits_unchanged(tok, one_thread):
    chat = load_chat_tokenizer(tok / "smollm3")
    convs = [Conversation([{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"The answer is {2 * i}."}], {"enable_thinking": i % 2 == 0})
             for i in range(4)]
    examples, _ = tokenize_conversations(convs, chat, seq_len=256)
    rows = [list(range(len(examples)))]
    assert sum(len(e.ids) for e in examples) <= 256
    model = build_model(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=256, nope_every=2, document_masking=True), seed=0)
    batch = PackedChatBatches(examples, rows, 256, 1, pad_id=0).next_batch()
    perturbed = dict(batch)
    perturbed["input_ids"] = batch["input_ids"].clone()
    first = batch["document_ids"][0] == 2
    perturbed["input_ids"][0, first] = (perturbed["input_ids"][0, first] + 7) % VOCAB
    with torch.no_grad():
        a = model(batch["input_ids"], document_ids=batch["document_ids"])
        b = model(perturbed["input_ids"], document_ids=perturbed["document_ids"])
        others = batch["document_ids"][0] != 2
        torch.testing.assert_close(a[0, others], b[0, others], atol=1e-5, rtol=0)
        assert not torch.allclose(a[0, first], b[0, first])
        offset = 0
        for e in examples:  # and each equals the conversation alone
            alone = model(torch.from_numpy(e.ids)[None])
            torch.testing.assert_close(a[0, offset : offset + len(e.ids)], alone[0], atol=1e-5, rtol=0)
            offset += len(e.ids)


def test_batch_source_resumes_exactly_and_reshuffles_each_epoch(tok):
    chat = load_chat_tokenizer(tok / "smollm3")
    examples, _ = tokenize_conversations(conversations(60), chat, seq_len=128, overflow="drop")
    rows = pack_best_fit([len(e.ids) for e in examples], 128)
    source = PackedChatBatches(examples, rows, 128, 2, pad_id=0, seed=5, dp_rank=1, dp_world=2)
    for _ in range(3):
        source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch() for _ in range(len(rows))]
    resumed = PackedChatBatches(examples, rows, 128, 2, pad_id=0, seed=5, dp_rank=1, dp_world=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    epoch0 = [source._row_at(i) for i in range(len(rows))]
    epoch1 = [source._row_at(len(rows) + i) for i in range(len(rows))]
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1)) and epoch0 != epoch1
    with pytest.raises(DataError, match="rows"):
        PackedChatBatches(examples, rows.to_lists()[:-1], 128, 2, pad_id=0).load_state_dict(state)


def test_overflow_is_truncated_keeping_the_start_or_dropped_and_counted(tok):
    chat = load_chat_tokenizer(tok / "smollm3")
    convs = conversations(30)
    full, _ = tokenize_conversations(convs, chat, seq_len=10_000)
    limit = sorted(len(e.ids) for e in full)[len(full) // 2]
    kept, stats = tokenize_conversations(convs, chat, seq_len=limit)
    longer = [e for e in full if len(e.ids) > limit]
    assert stats["truncated"] + stats.get("dropped_no_target", 0) == len(longer)
    for e in kept:
        assert e.ids.tolist() == full[[f.index for f in full].index(e.index)].ids[: len(e.ids)].tolist()
    dropped, stats = tokenize_conversations(convs, chat, seq_len=limit, overflow="drop")
    assert stats["dropped_too_long"] == len(longer) and len(dropped) == len(full) - len(longer)


def test_data_check_stops_when_the_template_drops_a_system_prompt(tok):
    """custom_instructions without a system message: smollm3 renders them, plain ChatML drops them."""
    convs = [Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "HELLO"}],
                          {"custom_instructions": "Answer in capital letters only."}, "persona", "personas.jsonl:7")]
    chat = load_chat_tokenizer(tok / "smollm3")
    report = data_report(ChatCounts.of(convs, chat), {}, 1, 256)
    assert report["system_prompt_share"] == report["system_prompt_rendered_share"] == 1.0
    chatml = load_chat_tokenizer(tok / "chatml")
    with pytest.raises(DataError, match=r"personas.jsonl:7: its system prompt 'Answer in capital letters only.'"):
        ChatCounts.of(convs, chatml)


def test_data_report_counts_match_an_independent_count(tok):
    chat = load_chat_tokenizer(tok / "smollm3")
    convs = conversations(100)
    examples, stats = tokenize_conversations(convs, chat, seq_len=256)
    rows = pack_best_fit([len(e.ids) for e in examples], 256)
    sources = sorted({e.source for e in examples})
    trained = trained_shares(sources, np.array([sources.index(e.source) for e in examples]),
                             np.array([len(e.ids) for e in examples]), np.array([e.targets.sum() for e in examples]),
                             np.arange(len(examples)))
    report = data_report(ChatCounts.of(convs, chat, stats), trained, len(rows), 256, template="smollm3")
    masks = [encode_chat(chat, c.messages, **c.kwargs)[1] for c in convs]
    assert report["target_tokens"] == sum(sum(m[1:256]) for m in masks if sum(m[1:256]))
    assert report["packing_efficiency"] == pytest.approx(report["tokens"] / (len(rows) * 256))
    assert set(report["rendered_examples"]) == {"think", "no_think", "system_prompt"}
    assert "Rendered example: system_prompt" in report_markdown(report)
