"""Preference losses and metrics: each against its formula by hand, the limits the formulas imply,
and TRL 1.16's own DPOTrainer loss code on the same log-probabilities."""

import math
import types
from collections import defaultdict

import pytest
import torch

from smoltrain.errors import ConfigError
from smoltrain.post.preference.losses import LOSSES, pair_losses, preference_losses, reward_metrics, sft_losses

# Summed log-probs of 4 pairs: policy chosen/rejected, reference chosen/rejected, completion lengths.
PC = torch.tensor([-10.0, -22.5, -7.25, -40.0], dtype=torch.float64)
PR = torch.tensor([-12.0, -20.0, -9.5, -38.0], dtype=torch.float64)
RC = torch.tensor([-11.0, -21.0, -7.0, -41.5], dtype=torch.float64)
RR = torch.tensor([-11.5, -21.5, -8.0, -37.0], dtype=torch.float64)
NC = torch.tensor([5, 9, 3, 17])
NR = torch.tensor([6, 8, 4, 15])


def sig(x):
    return 1 / (1 + math.exp(-x))


def by_hand(loss, beta, i):
    rw, rl = PC[i].item() - RC[i].item(), PR[i].item() - RR[i].item()
    if loss == "apo_zero":
        return 1 - sig(beta * rw) + sig(beta * rl)
    if loss == "apo_down":
        return sig(beta * rw) + 1 - sig(beta * (rw - rl))
    if loss == "dpo":
        return -math.log(sig(beta * (rw - rl)))
    return (rw / NC[i].item() - rl / NR[i].item() - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_each_loss_equals_its_formula_by_hand(loss, beta):
    got = preference_losses(PC, PR, RC, RR, loss, beta, NC, NR)
    want = torch.tensor([by_hand(loss, beta, i) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_small_beta_limits_are_the_formulas_constants():
    beta = 1e-9
    # sigma(0) = 1/2: apo_zero -> 1, apo_down -> 1, dpo -> log 2 whatever the log-probs.
    for loss, limit in (("apo_zero", 1.0), ("apo_down", 1.0), ("dpo", math.log(2))):
        torch.testing.assert_close(preference_losses(PC, PR, RC, RR, loss, beta), torch.full((4,), limit, dtype=torch.float64))
    # ipo is dominated by the 1/(2 beta) target: loss x (2 beta)^2 -> 1.
    ipo = preference_losses(PC, PR, RC, RR, "ipo", beta, NC, NR)
    torch.testing.assert_close(ipo * (2 * beta) ** 2, torch.ones(4, dtype=torch.float64))


def test_identical_answers_give_the_values_at_zero_margin():
    beta = 0.1
    # chosen == rejected: the margin is zero.
    torch.testing.assert_close(preference_losses(PC, PC, RC, RC, "dpo", beta), torch.full((4,), math.log(2), dtype=torch.float64))
    ipo = preference_losses(PC, PC, RC, RC, "ipo", beta, NC, NC)
    torch.testing.assert_close(ipo, torch.full((4,), (1 / (2 * beta)) ** 2, dtype=torch.float64))
    # apo_zero: 1 - sigma(b r) + sigma(b r) = 1 exactly; apo_down: sigma(b r) + 1/2.
    torch.testing.assert_close(preference_losses(PC, PC, RC, RC, "apo_zero", beta), torch.ones(4, dtype=torch.float64))
    rw = beta * (PC - RC)
    torch.testing.assert_close(preference_losses(PC, PC, RC, RC, "apo_down", beta), torch.sigmoid(rw) + 0.5)
    # policy == reference: every log-ratio is 0.
    torch.testing.assert_close(preference_losses(PC, PR, PC, PR, "apo_zero", beta), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(preference_losses(PC, PR, PC, PR, "apo_down", beta), torch.ones(4, dtype=torch.float64))


def test_swapping_chosen_and_rejected_behaves_as_the_formulas_say():
    beta = 0.2
    rw, rl = beta * (PC - RC), beta * (PR - RR)
    dpo, dpo_swapped = (preference_losses(a, b, c, d, "dpo", beta) for a, b, c, d in ((PC, PR, RC, RR), (PR, PC, RR, RC)))
    # -log sigma(m) - (-log sigma(-m)) = -m
    torch.testing.assert_close(dpo - dpo_swapped, -(rw - rl))
    apo, apo_swapped = (preference_losses(a, b, c, d, "apo_zero", beta) for a, b, c, d in ((PC, PR, RC, RR), (PR, PC, RR, RC)))
    # the two add up to 2 (each sigmoid term appears once with each sign)
    torch.testing.assert_close(apo + apo_swapped, torch.full((4,), 2.0, dtype=torch.float64))
    ipo, ipo_swapped = (preference_losses(a, b, c, d, "ipo", beta, n1, n2)
                        for a, b, c, d, n1, n2 in ((PC, PR, RC, RR, NC, NR), (PR, PC, RR, RC, NR, NC)))
    delta = (PC - RC) / NC - (PR - RR) / NR
    torch.testing.assert_close(ipo - ipo_swapped, -4 * delta / (2 * beta))


def test_gradients_push_chosen_up_and_rejected_down_for_apo_zero_and_dpo():
    for loss in ("apo_zero", "dpo"):
        pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
        preference_losses(pc, pr, RC, RR, loss, 0.1).sum().backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all()
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    preference_losses(pc, pr, RC, RR, "apo_down", 0.1).sum().backward()
    assert (pr.grad > 0).all()  # apo_down lowers the rejected answer


def test_sft_term_is_the_chosen_nll_per_token():
    want = torch.tensor([-PC[i].item() / NC[i].item() for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(sft_losses(PC, NC), want)
    total = pair_losses(PC, PR, RC, RR, NC, NR, "apo_zero", 0.1, sft_weight=0.5)
    torch.testing.assert_close(total, preference_losses(PC, PR, RC, RR, "apo_zero", 0.1) + 0.5 * want)


def test_metrics_are_trl_quantities_by_hand():
    beta = 0.1
    metrics = reward_metrics(PC, PR, RC, RR, beta)
    chosen = [beta * (PC[i].item() - RC[i].item()) for i in range(4)]
    rejected = [beta * (PR[i].item() - RR[i].item()) for i in range(4)]
    means = {name: s.item() / n for name, (s, n) in metrics.items()}
    assert means["rewards/chosen"] == pytest.approx(sum(chosen) / 4)
    assert means["rewards/rejected"] == pytest.approx(sum(rejected) / 4)
    assert means["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 4)
    assert means["rewards/margins"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 4)
    assert means["logps/chosen"] == pytest.approx(PC.mean().item())
    assert means["logps/rejected"] == pytest.approx(PR.mean().item())
    # ties are not counted as correct (TRL: chosen > rejected, strictly)
    tie = reward_metrics(PC, PC, RC, RC, beta)["rewards/accuracies"][0]
    assert tie.item() == 0


def test_bad_loss_names_and_betas_are_config_errors():
    with pytest.raises(ConfigError, match="dpo.loss must be one of"):
        preference_losses(PC, PR, RC, RR, "sigmoid", 0.1)
    with pytest.raises(ConfigError, match="dpo.beta must be positive"):
        preference_losses(PC, PR, RC, RR, "dpo", 0.0)


# ----------------------------------------------------------------------------- against TRL's own code


def _trl_loss(loss_types, loss_weights, beta, per_token, completion_mask, ref_chosen, ref_rejected):
    """Run DPOTrainer._compute_loss on given per-token policy log-probs, without a model: a stand-in
    `self` with the attributes the method reads, and a model whose output carries those log-probs."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    pairs = ref_chosen.shape[0]
    seq = completion_mask.shape[1]
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )

    def model(**kwargs):
        return types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * pairs, seq - 1),
                                     mean_logits=torch.zeros(2 * pairs, seq - 1),
                                     is_top1=torch.zeros(2 * pairs, seq - 1, dtype=torch.bool))

    inputs = {
        "input_ids": torch.zeros(2 * pairs, seq, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _per_token(lengths, totals, seq, seed):
    """Per-token log-probs ([rows, seq - 1], shifted like TRL's) whose completion sums are `totals`,
    and the matching completion mask ([rows, seq]): prompt of 2 tokens, then the completion."""
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    per_token = torch.zeros(rows, seq - 1, dtype=torch.float64)
    for i, (n, total) in enumerate(zip(lengths, totals)):
        mask[i, 2 : 2 + n] = 1
        w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
        per_token[i, 1 : 1 + n] = total * w / w.sum()
    return per_token, mask


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_and_metrics_match_trl_dpo_trainer(loss):
    beta = 0.1
    per_token, mask = _per_token(NC.tolist() + NR.tolist(), PC.tolist() + PR.tolist(), seq=20, seed=0)
    trl_name = {"dpo": "sigmoid"}.get(loss, loss)
    trl_value, trl_metrics = _trl_loss([trl_name], [1.0], beta, per_token, mask, RC, RR)
    ours = preference_losses(PC, PR, RC, RR, loss, beta, NC, NR).mean()
    torch.testing.assert_close(ours, trl_value, rtol=1e-10, atol=1e-10)
    for name, (total, count) in reward_metrics(PC, PR, RC, RR, beta).items():
        assert total.item() / count == pytest.approx(trl_metrics[name], rel=1e-9, abs=1e-12), name


def test_sft_term_matches_trl_sft_loss_type_at_equal_chosen_lengths():
    beta, weight = 0.1, 0.3
    lengths = [7, 7, 7, 7]
    per_token, mask = _per_token(lengths + NR.tolist(), PC.tolist() + PR.tolist(), seq=20, seed=1)
    trl_value, _ = _trl_loss(["apo_zero", "sft"], [1.0, weight], beta, per_token, mask, RC, RR)
    ours = pair_losses(PC, PR, RC, RR, torch.tensor(lengths), NR, "apo_zero", beta, sft_weight=weight).mean()
    torch.testing.assert_close(ours, trl_value, rtol=1e-10, atol=1e-10)
