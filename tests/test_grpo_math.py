"""GRPO's arithmetic against hand computations on fixed rewards and log-probabilities."""

import math
import statistics

import pytest
import torch

from smoltrain.post.rl.grpo import (
    aggregate,
    group_advantages,
    k3_kl,
    per_token_loss,
    soft_overlong_penalty,
)

EPS = 1e-4


def test_group_advantages_use_the_bessel_std_of_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    std = statistics.stdev([1, 0, 0, 1])  # Bessel-corrected, as torch.std and TRL
    expected = [0.5 / (std + EPS), -0.5 / (std + EPS), -0.5 / (std + EPS), 0.5 / (std + EPS), 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_batch_scaling_divides_by_the_std_of_the_whole_batch_and_none_by_nothing():
    values = [3.0, 1.0, 0.0, 0.5, 2.0, 2.5]
    rewards = torch.tensor(values)
    means = [statistics.mean(values[:3])] * 3 + [statistics.mean(values[3:])] * 3
    std = statistics.stdev(values)
    batch = group_advantages(rewards, 3, "batch")
    assert batch.tolist() == pytest.approx([(v - m) / (std + EPS) for v, m in zip(values, means)], rel=1e-6)
    none = group_advantages(rewards, 3, "none")
    assert none.tolist() == pytest.approx([v - m for v, m in zip(values, means)], rel=1e-6)


def test_unscorable_completions_get_zero_advantage_and_leave_the_group_statistics():
    rewards = torch.tensor([1.0, 99.0, 0.0, 1.0])
    scorable = torch.tensor([True, False, True, True])
    adv = group_advantages(rewards, 4, "group", scorable)
    mean, std = statistics.mean([1, 0, 1]), statistics.stdev([1, 0, 1])
    assert adv.tolist() == pytest.approx([(1 - mean) / (std + EPS), 0.0, (0 - mean) / (std + EPS), (1 - mean) / (std + EPS)])
    # a group with nothing scorable has nothing to learn from
    assert group_advantages(rewards, 4, "group", torch.zeros(4, dtype=torch.bool)).tolist() == [0.0] * 4


def _logprobs(ratios, old=-1.0):
    old_lp = torch.full((1, len(ratios)), old)
    new = (old_lp + torch.log(torch.tensor([ratios]))).requires_grad_()
    return new, old_lp


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_clipped_objective_clips_at_one_minus_eps_and_one_plus_eps_high(advantage):
    ratios = [0.5, 0.9, 1.0, 1.2, 1.5]
    eps, eps_high = 0.2, 0.28
    new, old = _logprobs(ratios)
    loss, parts = per_token_loss(new, torch.tensor([advantage]), old, epsilon=eps, epsilon_high=eps_high)
    clip = [min(max(r, 1 - eps), 1 + eps_high) for r in ratios]
    expected = [-min(r * advantage, c * advantage) for r, c in zip(ratios, clip)]
    assert loss[0].tolist() == pytest.approx(expected, rel=1e-6)
    # the gradient wrt log p is -A * ratio where the unclipped side won, 0 where the clip did
    loss.sum().backward()
    unclipped = [r * advantage <= c * advantage for r, c in zip(ratios, clip)]
    expected_grad = [-advantage * r if keep else 0.0 for r, keep in zip(ratios, unclipped)]
    assert new.grad[0].tolist() == pytest.approx(expected_grad, rel=1e-6, abs=1e-7)
    if advantage > 0:
        assert parts["high_clipped"][0].tolist() == [False, False, False, False, True]
        assert not parts["low_clipped"].any()
    else:
        assert parts["low_clipped"][0].tolist() == [True, False, False, False, False]
        assert not parts["high_clipped"].any()


def test_on_policy_ratio_is_one_and_the_gradient_is_the_plain_policy_gradient():
    new = torch.tensor([[-0.3, -2.0], [-1.1, -0.7]], requires_grad=True)
    adv = torch.tensor([0.5, -2.0])
    loss, parts = per_token_loss(new, adv)  # no stored old log-probs: mu = 1
    assert parts["ratio"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert loss.flatten().tolist() == pytest.approx([-0.5, -0.5, 2.0, 2.0])
    loss.sum().backward()
    assert new.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 2.0, 2.0])


def test_k3_kl_and_its_ratio_weighted_term():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-0.7, -2.0, -1.5]])
    by_hand = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref[0].tolist(), logp[0].tolist())]
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand[1] == 0 and min(by_hand) >= 0
    old = logp - torch.tensor([[0.1, 0.0, -0.2]])
    ratio = torch.exp(logp - old)[0].tolist()
    beta, adv = 0.04, 0.0  # zero advantage isolates the KL term
    with_correction, _ = per_token_loss(logp, torch.tensor([adv]), old, beta=beta, ref_logprobs=ref)
    plain, parts = per_token_loss(logp, torch.tensor([adv]), old, beta=beta, ref_logprobs=ref, kl_bias_correction=False)
    assert with_correction[0].tolist() == pytest.approx([beta * k * r for k, r in zip(by_hand, ratio)], rel=1e-5)
    assert plain[0].tolist() == pytest.approx([beta * k for k in by_hand], rel=1e-5)
    assert parts["kl"][0].tolist() == pytest.approx(by_hand, rel=1e-6)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.5, 0.5]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])


def test_each_aggregation_equals_its_formula():
    total, count = aggregate(LOSS, MASK, "dapo")
    assert (total.item(), count.item()) == (1 + 2 + 4 + 1.5, 6)
    total, count = aggregate(LOSS, MASK, "grpo")
    assert total.item() == pytest.approx(3 / 2 + 4 / 1 + 1.5 / 3) and count.item() == 3
    total, count = aggregate(LOSS, MASK, "dr_grpo", max_completion_length=8)
    assert total.item() == pytest.approx(8.5 / 8) and count.item() == 3


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_sums_over_micro_batches_divided_by_counts_equal_the_whole_batch_formula(loss_type):
    """What the loop does (sum of sums / sum of counts) equals TRL's normalisation of the whole batch."""
    parts = [aggregate(LOSS[i : i + 1], MASK[i : i + 1], loss_type, 8) for i in range(3)]
    split = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    mask = MASK.float()
    whole = {"dapo": (LOSS * mask).sum() / mask.sum(),  # token mean over the global batch
             "grpo": ((LOSS * mask).sum(-1) / mask.sum(-1)).mean(),  # mean of sequence means
             "dr_grpo": (LOSS * mask).sum() / (3 * 8)}[loss_type]  # batch x max_completion_length
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)


def test_fully_masked_sequence_counts_in_grpo_but_adds_nothing():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])  # a truncated completion under mask_truncated
    total, count = aggregate(LOSS[:2], mask, "grpo")
    assert total.item() == pytest.approx(1.5) and count.item() == 2
    total, count = aggregate(LOSS[:2], mask, "dapo")
    assert total.item() == 3 and count.item() == 2


def test_soft_overlong_penalty_is_zero_then_linear_then_minus_one():
    max_len, cache = 20, 8
    assert [soft_overlong_penalty(n, max_len, cache) for n in (0, 5, 12)] == [0.0, 0.0, 0.0]
    assert [soft_overlong_penalty(n, max_len, cache) for n in (13, 16, 20)] == pytest.approx([-1 / 8, -4 / 8, -1.0])
    assert [soft_overlong_penalty(n, max_len, cache) for n in (21, 500)] == [-1.0, -1.0]
