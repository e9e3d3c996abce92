"""Rollouts: what the KV-cache sampler says it sampled equals a teacher-forced recompute through the
training forward; lockstep padding and extra decode steps change nothing; the batches' layout."""

import pytest
import torch

from smoltrain.config import ModelConfig
from smoltrain.model.generate import sample
from smoltrain.model.transformer import build_model, token_logprobs
from smoltrain.post.rl.rollout import completion_logprobs, generate_rollouts, micro_batches

VOCAB = 200


# A Qwen3-Next-style hybrid: gated DeltaNet layers (2 key heads -> 4 value heads, conv 4) around a gated
# full-attention layer with partial RoPE.
HYBRID = dict(num_layers=3, full_attention_every=2, attention_output_gate=True, partial_rotary_factor=0.5,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)


def _model(**hybrid):
    config = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=96, max_seq_len=64), **hybrid})
    model = build_model(config, seed=3)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(4)  # peakier than the init, far from uniform
    return model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("temperature, hybrid", [(1.0, False), (0.7, False), (0.7, True)], ids=["t1", "t0.7", "hybrid"])
def test_rollout_logprobs_equal_a_teacher_forced_recompute(temperature, hybrid):
    """On the hybrid, prompts of 1 and 2 tokens left-padded beside 11: a linear layer's convolution state
    must not carry the padding's inputs into the first decoded token."""
    model = _model(**(HYBRID if hybrid else {}))
    stops = set(range(1, VOCAB, 8))  # end tokens: ~1 draw in 8 stops a row, so both kinds occur
    rollouts = generate_rollouts(model, _prompts([5, 11, 2] + ([1] if hybrid else [])), num_generations=3,
                                 max_completion_length=12, temperature=temperature, top_p=0.9, stop_tokens=stops,
                                 generator=torch.Generator().manual_seed(0))
    assert len(rollouts) == (12 if hybrid else 9) and rollouts.prompt_ids[0] == rollouts.prompt_ids[2] != rollouts.prompt_ids[3]
    for ids, truncated in zip(rollouts.completion_ids, rollouts.truncated):
        # kept up to and including the first stop token; truncated exactly when there is none
        ends = [t in stops for t in ids]
        assert (not any(ends)) == truncated and sum(ends) <= 1 and (truncated or ends[-1])
        assert truncated or len(ids) <= 12
    assert any(rollouts.truncated) and not all(rollouts.truncated)  # the test sees both kinds
    for batch in micro_batches(rollouts, torch.zeros(len(rollouts)), size=4):
        with torch.no_grad():
            recomputed = token_logprobs(model, batch["input_ids"], batch["labels"], temperature=temperature)
        mask = batch["labels"] != -100
        torch.testing.assert_close(recomputed[mask], batch["sampling_logprobs"][mask], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("size, hybrid", [(4, False), (9, False), (4, True)], ids=["4", "9", "hybrid-4"])
def test_prompts_run_once_per_micro_batch_give_the_full_rows_logprobs_and_gradients(size, hybrid):
    """completion_logprobs (each distinct prompt once, its G completions attending to it, or on a hybrid's
    linear layers continuing from its state) against the plain forward over every prompt + completion
    row: the same values and parameter gradients, with prompts of 1 token (nothing before the last) and
    of 3 (fewer than the convolution's kernel), groups split over micro-batches and stop tokens."""
    model = _model(**(HYBRID if hybrid else {}))
    rollouts = generate_rollouts(model, _prompts([5, 11, 1, 3]), num_generations=3, max_completion_length=12,
                                 temperature=0.7, stop_tokens=set(range(1, VOCAB, 8)),
                                 generator=torch.Generator().manual_seed(0))
    assert any(rollouts.truncated) and not all(rollouts.truncated)  # rows of different lengths
    batches = micro_batches(rollouts, torch.zeros(12), size=size)
    # rows 0-2, 3-5, 6-8, 9-11 answer prompts of 5, 11, 1 and 3 tokens: each distinct prompt once, but its last token
    assert [b["prompt_ids"].shape for b in batches] == ([(2, 10), (2, 10), (2, 2)] if size == 4 else [(3, 10), (1, 2)])
    for batch in batches:
        weights = torch.randn(batch["labels"].shape, generator=torch.Generator().manual_seed(1))
        full, full_grads = _with_gradients(model, weights, token_logprobs, batch["input_ids"], batch["labels"], 0.7)
        shared, shared_grads = _with_gradients(model, weights, completion_logprobs, batch, 0.7)
        torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
        assert not shared[batch["labels"] == -100].any()
        for a, b in zip(shared_grads, full_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _with_gradients(model, weights, logprobs, *args):
    model.zero_grad()
    values = logprobs(model, *args)
    (values * weights).sum().backward()
    return values.detach(), [p.grad.clone() for p in model.parameters()]


def test_micro_batches_put_labels_on_completion_tokens_and_mask_truncated_rows():
    from smoltrain.post.rl.rollout import Rollouts

    rollouts = Rollouts(prompt_ids=[[5, 6, 7], [5, 6, 7], [9], [9]], completion_ids=[[1, 2], [3], [4, 4, 4], [8]],
                        logprobs=[[-0.1, -0.2], [-0.3], [-1.0, -1.0, -1.0], [-0.5]], entropies=[[0] * 2, [0], [0] * 3, [0]],
                        truncated=[False, True, True, False])
    first, second = micro_batches(rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5]), size=2, mask_truncated=True, pad_id=0)
    assert first["input_ids"].tolist() == [[5, 6, 7, 1, 2], [5, 6, 7, 3, 0]]
    assert first["labels"].tolist() == [[-100, -100, 1, 2, -100], [-100, -100, 3, -100, -100]]
    assert first["loss_mask"].tolist() == [[False, False, True, True, False], [False] * 5]
    assert second["input_ids"].tolist() == [[9, 4, 4, 4], [9, 8, 0, 0]]
    assert second["labels"].tolist() == [[4, 4, 4, -100], [8, -100, -100, -100]]
    assert second["loss_mask"].tolist() == [[False] * 4, [True, False, False, False]]
    assert second["advantages"].tolist() == [0.5, -0.5]
    assert first["sampling_logprobs"][0, 2:4].tolist() == pytest.approx([-0.1, -0.2])
    # each distinct prompt once but its last token, which starts every row's tail
    assert first["prompt_ids"].tolist() == [[5, 6]] and first["prompt_of_row"].tolist() == [0, 0]
    assert first["tail_ids"].tolist() == [[7, 1], [7, 0]] and first["tail_start"].tolist() == [2, 2]
    assert second["prompt_real"].tolist() == [[False]] and second["tail_ids"].tolist() == [[9, 4, 4], [9, 0, 0]]


def test_lockstep_padding_and_extra_decode_steps_leave_the_samples_unchanged():
    """What another rank forces on this one (a longer prompt, rows still running) is invisible."""
    model = _model()
    prompts = _prompts([4, 9])
    free = sample(model, prompts, 10, generator=torch.Generator().manual_seed(5))
    stop = free.tokens[0][3]
    alone = sample(model, prompts, 10, 1.0, None, None, [stop], torch.Generator().manual_seed(5))
    calls = []

    def other_rank_is_longer_and_never_done(n):
        calls.append(n)
        if n < 0:  # -(prefill chunk): the other rank's chunk is no smaller
            return n
        return max(n, 17) if n > 1 else 1  # a 17-token prompt elsewhere; someone is always running

    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    synced = sample(model, prompts, 10, 1.0, None, None, [stop], torch.Generator().manual_seed(5),
                    lockstep=other_rank_is_longer_and_never_done)
    hook.remove()
    assert synced.tokens == alone.tokens and synced.finished == alone.finished == [True, False]
    for a, b in zip(synced.logprobs, alone.logprobs):  # longer padding: another summation order
        assert a == pytest.approx(b, abs=1e-5)
    assert calls[0] == 9 and len(forwards) == 1 + 9  # one prefill chunk, then every decode step


def test_per_row_generators_make_a_row_independent_of_its_batch_mates():
    """What lets N data-parallel ranks sample exactly what one process samples."""
    model = _model()
    prompts = _prompts([4, 9, 6])
    seeds = [11, 12, 13]
    together = sample(model, prompts, 8, 1.0, 20, 0.9, (), [torch.Generator().manual_seed(s) for s in seeds])
    for i in range(3):
        alone = sample(model, [prompts[i]], 8, 1.0, 20, 0.9, (), [torch.Generator().manual_seed(seeds[i])])
        assert alone.tokens[0] == together.tokens[i]
    again = sample(model, prompts, 8, 1.0, 20, 0.9, (), [torch.Generator().manual_seed(s) for s in seeds])
    assert again.tokens == together.tokens and len({tuple(t) for t in together.tokens}) == 3


def test_a_prompt_prefilled_once_for_its_group_samples_as_if_repeated():
    model = _model()
    prompts = _prompts([4, 9])
    seeds = range(6)
    shared = sample(model, prompts, 8, 1.0, None, None, (), [torch.Generator().manual_seed(s) for s in seeds], repeats=3)
    repeated = sample(model, [p for p in prompts for _ in range(3)], 8, 1.0, None, None, (),
                      [torch.Generator().manual_seed(s) for s in seeds])
    assert shared.tokens == repeated.tokens and len(shared.tokens) == 6
    for a, b in zip(shared.logprobs, repeated.logprobs):
        assert a == pytest.approx(b, abs=1e-5)


def test_token_logprobs_run_the_head_on_labelled_positions_only():
    """A GRPO row's prompt has no labels: its positions skip the [tokens, vocab] head, values unchanged."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = torch.full((2, 9), -100)
    labels[0, 5:8] = ids[0, 6:9]
    labels[1, 2:4] = ids[1, 3:5]
    seen = []
    original = model.output
    model.output = lambda hidden: (seen.append(hidden.shape[0]), original(hidden))[1]
    try:
        got = token_logprobs(model, ids, labels)
        nothing = token_logprobs(model, ids, torch.full_like(labels, -100))
    finally:
        del model.output
    assert seen[0] == 5 and sum(seen[1:]) == 0  # 3 + 2 labelled positions of 18; then none at all
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(got.detach(), torch.where(labels != -100, expected, 0.0), atol=1e-5, rtol=1e-5)
    assert nothing.shape == (2, 9) and not nothing.any()
    got.sum().backward()  # differentiable through the scatter back into place
    assert model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
