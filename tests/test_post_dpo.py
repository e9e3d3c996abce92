"""The DPO objective's parts: batches that cover each pair once per epoch and re-split over ranks,
summed answer log-probs from one forward equal to per-sequence log-softmax by hand, and a reference
pass that is stored and then reused."""

import json

import pytest
import torch
import torch.nn.functional as F
from preference_helpers import SHAPE, preference_rows, save_init_model, write_rows

from smoltrain.config import config_from_dict
from smoltrain.errors import DataError
from smoltrain.model.transformer import build_model
from smoltrain.post.preference import stage as dpo_module
from smoltrain.post.preference.data import Pair, TextTokenizer, load_preferences
from smoltrain.post.preference.losses import pair_losses
from smoltrain.post.preference.stage import DPOObjective, PreferenceBatches, build_dpo_objective, reference_logps
from smoltrain.train.load_model import save_model_folder


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory):
    return save_init_model(tmp_path_factory.mktemp("init"), "model")


def cpu_ctx():
    from smoltrain.train.distributed import single_process_context

    return single_process_context("cpu")


def reference_setup(init_folder):
    """A one-process context and the config of a run whose train.init is the reference."""
    import dataclasses

    from smoltrain.train.distributed import single_process_context
    from smoltrain.train.load_model import load_any

    _, config, _ = load_any(init_folder)
    train = dataclasses.replace(config.train, init=str(init_folder), compile="off")
    return single_process_context("cpu", train), dataclasses.replace(config, train=train)


def _pairs(n):
    return [Pair([1, 2], [3 + i % 5], [4, 5 + i % 3]) for i in range(n)]


def test_batches_cover_every_pair_once_per_epoch_and_resplit_over_ranks():
    pairs = _pairs(10)
    one = PreferenceBatches(pairs, 2, 0, 1, seed=3, max_length=16, pad_id=0)
    seen = [one.next_batch()["pair_index"].tolist() for _ in range(5)]
    assert sorted(i for b in seen for i in b) == list(range(10))  # epoch 0: a permutation
    # two ranks with micro-batch 1 read the same global order, each its half of every round
    ranks = [PreferenceBatches(pairs, 1, r, 2, seed=3, max_length=16, pad_id=0) for r in range(2)]
    for batch in seen:
        assert [ranks[r].next_batch()["pair_index"].item() for r in range(2)] == batch
    # the state is global: saved by one layout, it resumes in another
    state = one.state_dict()
    other = PreferenceBatches(pairs, 1, 1, 2, seed=3, max_length=16, pad_id=0)
    other.load_state_dict(state)
    nxt = one.next_batch()["pair_index"].tolist()
    assert one.epoch == 1 and other.next_batch()["pair_index"].tolist() == nxt[1:]
    with pytest.raises(DataError, match="trained on 10 preference pairs, the data now has 9"):
        PreferenceBatches(pairs[:9], 2, 0, 1, 3, 16, 0).load_state_dict(state)


def test_an_epoch_drops_the_remainder_that_does_not_fill_a_round():
    batches = PreferenceBatches(_pairs(7), 3, 0, 1, seed=0, max_length=16, pad_id=0)
    batches.skip(2)
    assert (batches.epoch, batches.position) == (0, 6)
    batches.next_batch()
    assert (batches.epoch, batches.position) == (1, 3)


def _by_hand_logp(model, prompt, answer):
    """log p(answer | prompt) from the full logits of one unpadded sequence."""
    ids = torch.tensor([prompt + answer])
    logits = model(ids)[0].double()
    logp = F.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer))


@pytest.mark.parametrize("loss", ["apo_zero", "dpo", "ipo"])
def test_objective_loss_is_the_formula_on_log_probs_summed_by_hand(init_folder, tmp_path, loss, one_thread):
    from smoltrain.train.load_model import load_any

    tok = TextTokenizer.load(init_folder)
    data = load_preferences(write_rows(tmp_path / "p.jsonl", preference_rows(4)), tok)
    policy, _, _ = load_any(init_folder)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference, _, _ = load_any(init_folder)
    config = config_from_dict({"model": SHAPE, "data": {"seq_len": 32}, "dpo": {"loss": loss, "beta": 0.5, "sft_weight": 0.2},
                               "train": {"micro_batch_size": 4, "global_batch_tokens": 128}})
    batches = PreferenceBatches(data.pairs, 4, 0, 1, 0, 1024, tok.eos_id)
    objective = DPOObjective(config, batches, [], None, reference, tok.eos_id, torch.device("cpu"), "fp32")
    batch = batches.next_batch()
    total, count, metrics = objective.loss(policy, batch)
    pairs = [data.pairs[i] for i in batch["pair_index"].tolist()]
    with torch.no_grad():
        pc, pr, rc, rr = (torch.tensor([_by_hand_logp(m, p.prompt_ids, getattr(p, side)) for p in pairs], dtype=torch.float64)
                          for m, side in ((policy, "chosen_ids"), (policy, "rejected_ids"),
                                          (reference, "chosen_ids"), (reference, "rejected_ids")))
    nc = torch.tensor([len(p.chosen_ids) for p in pairs])
    nr = torch.tensor([len(p.rejected_ids) for p in pairs])
    want = pair_losses(pc, pr, rc, rr, nc, nr, loss, 0.5, 0.2).sum()
    assert count == 4
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-5)
    assert metrics["logps/chosen"][0].item() == pytest.approx(pc.sum().item(), rel=1e-5)
    total.backward()  # one forward for both answers, gradients reach the policy only
    assert all(p.grad is not None for p in policy.parameters()) and all(p.grad is None for p in reference.parameters())


def test_reference_pass_is_stored_then_reused_without_loading_the_model(init_folder, tmp_path, monkeypatch, one_thread):
    from smoltrain.train.load_model import load_any

    tok = TextTokenizer.load(init_folder)
    pairs = load_preferences(write_rows(tmp_path / "p.jsonl", preference_rows(6)), tok).pairs
    splits = {"train": pairs[:4], "eval": pairs[4:]}
    ctx, config = reference_setup(init_folder)
    first = reference_logps(str(init_folder), splits, tmp_path, 3, 1024, tok.eos_id, ctx, "fp32", config)
    model, _, _ = load_any(init_folder)
    with torch.no_grad():
        for name, part in splits.items():
            want = torch.tensor([_by_hand_logp(model, p.prompt_ids, p.chosen_ids) for p in part])
            torch.testing.assert_close(first[name][0].double(), want.double(), rtol=1e-5, atol=1e-5)

    def no_loading(*args, **kwargs):
        raise AssertionError("the stored reference pass should be reused")

    monkeypatch.setattr("smoltrain.post.preference.stage.build_reference_model", no_loading)
    again = reference_logps(str(init_folder), splits, tmp_path, 3, 1024, tok.eos_id, ctx, "fp32", config)
    for name in splits:
        assert all(torch.equal(a, b) for a, b in zip(first[name], again[name]))
    with pytest.raises(DataError, match="stored for another reference model or other preference data"):
        reference_logps(str(init_folder), {"train": pairs[:3]}, tmp_path, 3, 1024, tok.eos_id, ctx, "fp32", config)


def test_build_objective_holds_out_pairs_and_checks_the_batch_split(init_folder, tmp_path, one_thread):
    from smoltrain.errors import ConfigError

    data = write_rows(tmp_path / "p.jsonl", preference_rows(12))
    config = config_from_dict({"model": SHAPE, "data": {"seq_len": 32},
                               "train": {"micro_batch_size": 2, "global_batch_tokens": 64, "init": str(init_folder)},
                               "dpo": {"train_data": [str(data)], "holdout_pairs": 4, "pairs_per_step": 4}})
    objective = build_dpo_objective(config, None, cpu_ctx(), tmp_path)
    assert len(objective.batches.pairs) == 8 and len(objective.eval_pairs) == 4
    assert objective.accumulation(1024, 1) == 2
    assert (tmp_path / dpo_module.REFERENCE_FILE).is_file()
    with pytest.raises(ConfigError, match="dpo.pairs_per_step \\(4\\) must be a multiple of"):
        objective.accumulation(1024, 3)
    result = objective.evaluate(build_model(config.model, seed=5))  # the init model itself: rewards 0
    assert result["preference"]["pairs"] == 4
    assert result["preference"]["margin"] == pytest.approx(0.0, abs=1e-5)


def test_chat_evals_before_training_and_at_evaluation(tmp_path, one_thread, monkeypatch):
    import functools
    import sys
    from pathlib import Path

    import smoltrain.post.chat.evals as chat_eval

    # short replies: this checks the wiring, the chat evals have their own tests
    monkeypatch.setattr(chat_eval, "chat_evals", functools.partial(chat_eval.chat_evals, max_new_tokens=6, think_max_new_tokens=6))
    monkeypatch.setattr(chat_eval, "vibe_test", functools.partial(chat_eval.vibe_test, max_new_tokens=6))

    sys.path.insert(0, str(Path(__file__).parent))
    from chat_helpers import VOCAB, chat_tokenizers

    chat_tokenizers(tmp_path)
    shape = {**SHAPE, "vocab_size": VOCAB, "max_seq_len": 256}
    config = config_from_dict({"model": shape, "data": {"seq_len": 32}, "train": {"micro_batch_size": 1, "global_batch_tokens": 32}})
    model = build_model(config.model, seed=5)
    save_model_folder(model, config, tmp_path / "init", tokenizer=tmp_path / "smollm3")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "chosen": [{"role": "assistant", "content": f"The answer is {i + 1}."}],
             "rejected": [{"role": "assistant", "content": "The answer is 0."}]} for i in range(1, 5)]
    data = write_rows(tmp_path / "p.jsonl", rows)
    config = config_from_dict({"model": shape, "data": {"seq_len": 32},
                               "train": {"micro_batch_size": 2, "global_batch_tokens": 64, "init": str(tmp_path / "init")},
                               "dpo": {"train_data": [str(data)], "pairs_per_step": 2, "chat_eval_items": 2}})
    objective = build_dpo_objective(config, model, cpu_ctx(), tmp_path)
    before = json.loads((tmp_path / "chat_before.json").read_text())
    assert before["chat"]["n"] == {"no_think": 2, "think": 2, "persona": 2} and before["vibe"]
    result = objective.evaluate(model)  # same weights: the same greedy replies
    assert result["chat"] == before["chat"]
    assert json.loads((tmp_path / "chat_after.json").read_text())["chat"] == before["chat"]
