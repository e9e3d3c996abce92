"""Generation against brute force (full recompute, no cache), transformers' generate, and the
sampling distributions written out by hand."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from smoltrain.config import ModelConfig
from smoltrain.model import generate as generation
from smoltrain.model.generate import generate, sample_next
from smoltrain.model.transformer import build_model
from smoltrain.report.hf_export import export_hf

VOCAB = 256
CONFIGS = {
    "rope-gqa": dict(num_heads=4, num_kv_heads=2),
    "nope-mqa": dict(num_heads=4, num_kv_heads=1, nope_every=2, tie_embeddings=False),
    "qk-norm-mha": dict(num_heads=4, num_kv_heads=4, qk_norm=True),
    "no-positions": dict(num_heads=4, num_kv_heads=2, position_encoding="none"),
}


def _model(name: str, max_seq_len: int = 64):
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=3, intermediate_size=96, max_seq_len=max_seq_len,
                         **CONFIGS[name])
    model = build_model(config, seed=7).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so argmax ties are not an issue
        model.embed_tokens.weight.mul_(25)
    return model


def _uncached_greedy(model, prompt, max_new_tokens):
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
        out.append(token)
        ids.append(token)
    return out


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_greedy_equals_uncached_argmax(name):
    model = _model(name)
    prompt = _prompts([11])[0]
    assert generate(model, [prompt], 16) == [_uncached_greedy(model, prompt, 16)]


@pytest.mark.parametrize("name", ["rope-gqa", "nope-mqa"])
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = _model(name)
    prompts = _prompts([3, 19, 8, 1])
    assert generate(model, prompts, 12) == [_uncached_greedy(model, p, 12) for p in prompts]


def test_chunked_prefill_equals_one_shot_prefill(monkeypatch):
    model = _model("rope-gqa")
    prompts = _prompts([20, 7])
    expected = generate(model, prompts, 8)
    monkeypatch.setattr(generation, "PREFILL_CHUNK_ELEMENTS", 3 * 2 * VOCAB)  # 3 tokens per chunk
    assert generate(model, prompts, 8) == expected


def test_greedy_matches_transformers_generate_on_exported_model(tmp_path):
    model = _model("nope-mqa")
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, local_files_only=True).eval()
    prompts = _prompts([6, 10])
    longest = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert generate(model, prompts, 10) == out[:, longest:].tolist()


def test_output_is_cut_before_the_first_stop_token():
    model = _model("rope-gqa")
    prompts = _prompts([5, 9, 4], seed=3)
    free = generate(model, prompts, 15)
    stop = free[0][4]
    stopped = generate(model, prompts, 15, stop_tokens=[stop])
    for row, full in zip(stopped, free):
        assert row == (full[: full.index(stop)] if stop in full else full)


def test_generation_past_max_seq_len_extends_rope_tables():
    model = _model("rope-gqa", max_seq_len=16)
    prompt = _prompts([10])[0]
    assert generate(model, [prompt], 12) == [_uncached_greedy(model, prompt, 12)]


def test_sampling_is_reproducible_with_a_seed_and_greedy_at_top_k_1():
    model = _model("rope-gqa")
    prompts = _prompts([4, 7])
    a = generate(model, prompts, 10, temperature=1.0, top_p=0.95, seed=11)
    b = generate(model, prompts, 10, temperature=1.0, top_p=0.95, seed=11)
    assert a == b
    assert generate(model, prompts, 10, temperature=0.7, top_k=1, seed=1) == generate(model, prompts, 10)


def _empirical(logits, n, **kwargs):
    draws = sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(draws, minlength=logits.shape[-1]).float() / n


def test_temperature_sampling_follows_softmax_of_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    freq = _empirical(logits, 40000, temperature=0.5, top_k=None, top_p=None)
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.5, -1), atol=0.01)


def test_top_k_and_top_p_renormalise_over_the_kept_tokens():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0], -1)  # sorted already: 0.43, 0.26, 0.16, 0.06, 0.02, 0.01
    freq = _empirical(logits, 40000, temperature=1.0, top_k=3, top_p=None)
    assert torch.allclose(freq, torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)]), atol=0.01)
    # Nucleus by hand: the smallest prefix whose mass reaches 0.8 is the first three tokens.
    assert probs[:2].sum() < 0.8 <= probs[:3].sum()
    freq = _empirical(logits, 40000, temperature=1.0, top_k=None, top_p=0.8)
    assert torch.allclose(freq, torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)]), atol=0.01)
    # A tiny top_p still keeps the most likely token.
    assert torch.equal(_empirical(logits, 100, temperature=1.0, top_k=None, top_p=1e-9), torch.eye(6)[0])


@pytest.mark.parametrize("rows, vocab, k", [(32, 4096, 50), (3, 2048, 1), (5, 1000, 50), (4, 6, 3)])
def test_top_k_through_column_maxima_equals_torch_topk(rows, vocab, k):
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    crowded = torch.arange(k) % 8 * (vocab // 8) + torch.arange(k) // 8  # row 0's top k in the fewest columns
    scores[0, crowded] = 50.0 + torch.arange(k, dtype=torch.float32)
    values, indices = generation._top_k(scores, k)
    expected = scores.topk(k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_invalid_arguments_are_refused():
    model = _model("rope-gqa")
    with pytest.raises(ValueError):
        generate(model, [[]], 3)
    with pytest.raises(ValueError):
        generate(model, [[1]], 3, temperature=-1.0)
    with pytest.raises(ValueError):
        generate(model, [[VOCAB]], 3)
    assert generate(model, [[1], [2, 3]], 0) == [[], []]
