"""Validation loss and bits per byte against a per-document brute-force reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_eval_scoring import tiny_model, tiny_tokenizer

from smoltrain.eval.validation import token_byte_lengths, validation_metrics

DOCS = ["def parse(items):\n    return items", "naïve café — 日本語 text", "The semantics for a slicing are as follows."]


def test_token_byte_lengths_add_up_to_the_utf8_length_of_any_text():
    tok = tiny_tokenizer()
    lengths = token_byte_lengths(tok)
    eot = tok.token_to_id("<|endoftext|>")
    assert lengths[eot] == 0
    for text in DOCS + ["  spaces\tand\nnewlines  ", "emoji 🙂 and ß"]:
        ids = tok.encode(text).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def _window(tok, seq_len):
    eot = tok.token_to_id("<|endoftext|>")
    stream, docs = [], []
    for d, text in enumerate(DOCS):
        ids = tok.encode(text).ids + [eot]  # the end-of-text token closes (belongs to) its document
        stream += ids
        docs += [d] * len(ids)
    stream, docs = stream[: seq_len + 1], docs[: seq_len + 1]
    return {
        "input_ids": torch.tensor([stream[:-1]]),
        "labels": torch.tensor([stream[1:]]),
        "document_ids": torch.tensor([docs[:-1]], dtype=torch.int32),
    }


def test_bits_per_byte_equal_per_document_nats_over_text_bytes():
    tok = tiny_tokenizer()
    model = tiny_model()
    eot = tok.token_to_id("<|endoftext|>")
    batch = _window(tok, seq_len=60)
    inputs, labels, docs = batch["input_ids"][0], batch["labels"][0], batch["document_ids"][0]

    # Reference: every document scored alone from its own start (what document masking means).
    nats = torch.zeros(len(inputs), dtype=torch.float64)
    for d in docs.unique():
        where = (docs == d).nonzero().flatten()
        with torch.no_grad():
            logits = model(inputs[where][None])[0]
        nats[where] = F.cross_entropy(logits.double(), labels[where], reduction="none")
    text_targets = [int(t) for t in labels if int(t) != eot]
    text_bytes = len(tok.decode(text_targets).encode("utf-8"))
    is_text = labels != eot

    got = validation_metrics(model, [batch], token_byte_lengths(tok))
    assert got["tokens"] == len(labels)
    assert got["loss"] == pytest.approx(float(nats.mean()), rel=1e-5)
    assert got["bpb"] == pytest.approx(float(nats[is_text].sum()) / (math.log(2) * text_bytes), rel=1e-5)


def test_ignored_labels_and_several_batches_are_summed_not_averaged_per_batch():
    tok = tiny_tokenizer()
    model = tiny_model()
    lengths = token_byte_lengths(tok)
    a = _window(tok, seq_len=40)
    b = _window(tok, seq_len=20)
    b["labels"][0, :5] = -100
    both = validation_metrics(model, [a, b], lengths)
    one_a = validation_metrics(model, [a], lengths)
    one_b = validation_metrics(model, [b], lengths)
    assert both["tokens"] == one_a["tokens"] + one_b["tokens"] == 40 + 15
    expected = (one_a["loss"] * one_a["tokens"] + one_b["loss"] * one_b["tokens"]) / both["tokens"]
    assert both["loss"] == pytest.approx(expected, rel=1e-6)
