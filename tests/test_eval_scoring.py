"""Log-likelihood scoring against transformers on an exported model, lighteval's tokenisation
boundary, and the four accuracies against a brute-force reference on hand-made items."""

import math

import pytest
import torch

from smoltrain.config import ModelConfig
from smoltrain.eval.scoring import choice_metrics, encode, encode_pair, loglikelihoods, score_multiple_choice
from smoltrain.eval.tasks import Task
from smoltrain.model.transformer import build_model

TEXT = [
    "Question: What is 12 + 7?\nAnswer: 19",
    "The semantics for a slicing are as follows. The primary must evaluate to a mapping object.",
    "def parse(items):\n    for value in items:\n        print(value)\n",
    "class Parser(Reader):\n    def __init__(self, data):\n        self.data = data\n",
]


def tiny_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    return tok


def tiny_model(vocab_size=300, seed=0, **overrides):
    shape = dict(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=64, max_seq_len=128, init_std=0.2)
    shape.update(overrides)
    return build_model(ModelConfig(**shape), seed=seed).eval()


ITEMS = [
    {"query": "Question: What is 12 + 7?\nAnswer:", "choices": [" 19", " 18", " 29", " 91"], "gold": 0},
    {"query": "The semantics for a slicing are as ", "choices": ["follows", "object", "mapping"], "gold": 0},
    {"query": "def parse(items):\n    for value", "choices": [" in", " is", " as", " not"], "gold": 0},
    {"query": "class Parser(Reader", "choices": ["):", "),", ");"], "gold": 0},
]


def _brute_force_sum(model, context_ids, continuation_ids):
    """One unbatched forward per request, log-softmax at every position, sum the answer's."""
    ids = torch.tensor([(context_ids + continuation_ids)[:-1]])  # the last token predicts nothing we score
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids)[0].double(), dim=-1)
    start = len(context_ids)
    return sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(continuation_ids))


def test_choice_loglikelihoods_match_transformers_on_the_exported_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from smoltrain.report.hf_export import export_hf

    tok = tiny_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model()
    export_hf(model, tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()

    requests = [encode_pair(tok, item["query"], choice) for item in ITEMS for choice in item["choices"]]
    ours = loglikelihoods(model, requests, batch_size=5)
    for (context_ids, continuation_ids), got in zip(requests, ours):
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
        start = len(context_ids)
        expected = sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(continuation_ids))
        assert abs(got - expected) <= 1e-4, (got, expected)


def test_context_answer_boundary_matches_lighteval_with_the_transformers_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok)

    def lighteval_pair(context, continuation):  # lighteval's tok_encode_pair, written out
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = hf_tok.encode(context + continuation, add_special_tokens=False)
        context_enc = hf_tok.encode(context, add_special_tokens=False)
        return context_enc, whole[len(context_enc):]

    cases = [(item["query"], c) for item in ITEMS for c in item["choices"]]
    cases += [("Answer: ", "19"), ("Answer:  \n", " 19"), ("no space", "follows")]
    for context, continuation in cases:
        assert encode_pair(tok, context, continuation) == lighteval_pair(context, continuation)
    # The trailing space of the context is scored as part of the answer.
    context_ids, answer_ids = encode_pair(tok, "The semantics for a slicing are as ", "follows")
    assert context_ids == encode(tok, "The semantics for a slicing are as")
    assert tok.decode(answer_ids) == " follows"


def test_batched_length_bucketed_scores_equal_one_forward_per_request():
    tok = tiny_tokenizer()
    model = tiny_model()
    requests = [encode_pair(tok, item["query"], choice) for item in ITEMS for choice in item["choices"]]
    for batch_size in (1, 3, 64):
        got = loglikelihoods(model, requests, batch_size=batch_size)
        for (ctx, cont), value in zip(requests, got):
            assert value == pytest.approx(_brute_force_sum(model, ctx, cont), abs=1e-5)


def test_long_contexts_are_cut_from_the_left_to_fit_the_model():
    model = tiny_model(max_seq_len=16)
    context, continuation = list(range(3, 40)), [7, 8, 9]
    (got,) = loglikelihoods(model, [(context, continuation)])
    kept = (context + continuation)[-17:]
    assert got == pytest.approx(_brute_force_sum(model, kept[:-3], continuation), abs=1e-5)


def _reference_accuracies(logprobs, choices, token_counts, gold):
    """lighteval's definitions with numpy's first-maximum argmax, computed independently."""
    import numpy as np

    def hit(scores):
        return float(int(np.argmax(np.array(scores))) == gold)

    return {
        "acc": hit(logprobs),
        "acc_norm": hit([lp / len(c) for lp, c in zip(logprobs, choices)]),
        "acc_norm_nospace": hit([lp / (len(c) - 1 if c[0] == " " else len(c)) for lp, c in zip(logprobs, choices)]),
        "acc_norm_token": hit([lp / n for lp, n in zip(logprobs, token_counts)]),
    }


@pytest.mark.parametrize("logprobs, choices, token_counts, gold", [
    # Exact tie between the first two choices: the first wins, so gold=1 scores 0 everywhere.
    ([-4.0, -4.0, -9.0], [" ab", " ab", " abcd"], [1, 1, 2], 1),
    ([-4.0, -4.0, -9.0], [" ab", " ab", " abcd"], [1, 1, 2], 0),
    # Raw sum prefers the short answer; per character the long one wins.
    ([-3.0, -5.0], [" a", " abcdefgh"], [1, 3], 1),
    # Leading space: " ab" is 2 characters without it, "abc" is 3; -4/2 < -5/3 only with nospace.
    ([-4.0, -5.0], [" ab", "abc"], [1, 1], 0),
    ([-4.0, -5.0], [" ab", "abc"], [1, 1], 1),
    # Token normalisation disagrees with character normalisation.
    ([-6.0, -4.0], [" abcdef", " ab"], [3, 1], 0),
])
def test_accuracies_match_brute_force_reference_including_ties_and_leading_spaces(logprobs, choices, token_counts, gold):
    assert choice_metrics(logprobs, choices, token_counts, gold) == _reference_accuracies(logprobs, choices, token_counts, gold)


def test_a_lone_space_answer_counts_as_one_character_instead_of_dividing_by_zero():
    # " " -> -1.0 / 1; "  x" -> -0.5 / 2 = -0.25 wins.
    assert choice_metrics([-1.0, -0.5], [" ", "  x"], [1, 1], gold=1)["acc_norm_nospace"] == 1.0


def test_task_metrics_average_brute_force_per_item_accuracies():
    tok = tiny_tokenizer()
    model = tiny_model(seed=3)
    task = Task(name="hand", kind="multiple_choice", items=ITEMS)
    result = score_multiple_choice(model, tok, task, batch_size=4)
    totals = dict.fromkeys(("acc", "acc_norm", "acc_norm_nospace", "acc_norm_token"), 0.0)
    for item in ITEMS:
        pairs = [encode_pair(tok, item["query"], c) for c in item["choices"]]
        sums = [_brute_force_sum(model, ctx, cont) for ctx, cont in pairs]
        ref = _reference_accuracies(sums, item["choices"], [len(cont) for _, cont in pairs], item["gold"])
        for key in totals:
            totals[key] += ref[key] / len(ITEMS)
    assert result["n"] == len(ITEMS)
    for key, value in totals.items():
        assert result[key] == pytest.approx(value)
    assert math.isfinite(result["acc_norm_nospace_stderr"])


def test_lettered_formulation_lists_choices_and_scores_letters():
    tok = tiny_tokenizer()
    model = tiny_model()
    item = {"query": "Question: What is 12 + 7?\nAnswer:", "question": "What is 12 + 7?",
            "choices": [" 19", " 18", " 29"], "gold": 2}
    task = Task(name="mcf", kind="multiple_choice", items=[item], formulation="mcf")
    details = []
    score_multiple_choice(model, tok, task, details=details)
    assert details[0]["context"] == "What is 12 + 7?\nA. 19\nB. 18\nC. 29\nAnswer:"
    assert details[0]["choices"] == [" A", " B", " C"]
    context_ids = encode(tok, details[0]["context"])
    expected = [_brute_force_sum(model, context_ids, encode(tok, letter)) for letter in (" A", " B", " C")]
    assert details[0]["logprobs"] == pytest.approx(expected, abs=1e-5)


def test_answers_differing_only_in_their_last_token_share_one_forward_row():
    model = tiny_model()
    seen_rows = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, input_ids, **kwargs):
            seen_rows.append(input_ids.shape[0])
            return self.inner(input_ids, **kwargs)

    context = [5, 6, 7, 8]
    requests = [(context, [t]) for t in (10, 11, 12, 13)]  # lettered choices: one token each
    requests += [(context, [20, t]) for t in (30, 31)]  # a shared first token, different last ones
    requests += [(context, [21, 30])]  # a different first token: its own row
    got = loglikelihoods(Counting(), requests, batch_size=64)
    assert sum(seen_rows) == 3
    for (ctx, cont), value in zip(requests, got):
        assert value == pytest.approx(_brute_force_sum(model, ctx, cont), abs=1e-5)


def test_requests_split_over_data_parallel_ranks_sum_to_the_one_rank_scores(monkeypatch):
    """Each of 4 ranks scores every 4th batch; summed over ranks the scores equal one rank's exactly,
    and every rank runs as many forwards as the busiest (FSDP gathers weights in each forward)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, 300, (int(n),), generator=g).tolist(), torch.randint(0, 300, (1 + i % 3,), generator=g).tolist())
                for i, n in enumerate(torch.randint(2, 20, (11,), generator=g))]
    whole = loglikelihoods(model, requests, batch_size=2)  # 11 rows -> 6 batches
    gathered, forwards = [], []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: gathered.append(tensor.clone()))
    for rank in range(4):  # 4 ranks: 2, 2, 1, 1 batches, so ranks 2 and 3 pad one forward each
        calls = []
        hook = model.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        loglikelihoods(model, requests, batch_size=2, data_parallel=(rank, 4, None))
        hook.remove()
        forwards.append(len(calls))
    assert forwards == [2, 2, 2, 2]
    assert sum(gathered).tolist() == whole
