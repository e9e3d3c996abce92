"""One answer checker: the same hand-made completions go through every caller (GRPO's reward and
pass@1, the chat evals, preference verification, the generative eval) and each must give the verdict
written here by hand."""

from types import SimpleNamespace

import pytest
import torch

from smoltrain.eval.answers import as_number, extract_answer, is_correct
from smoltrain.eval.generative import quasi_exact_match
from smoltrain.post.chat import evals as chat_eval
from smoltrain.post.preference import generate as preference_gen
from smoltrain.post.rl import stage as grpo_train
from smoltrain.post.rl.rewards import math_answer

# (completion, reference, verdict), each verdict decided by hand from the rule in eval/answers.py
CASES = [
    ("42", "42", True),
    ("The answer is 42.", "42", True),  # a trailing period
    ("<think>40 + 2 = 42</think>The answer is 42.", "42", True),
    ("<think>the answer is 42</think>The answer is 41.", "42", False),  # the think block's numbers never count
    ("<think>6 * 7 = 42</think>", "42", False),  # the answer inside the think block only
    ("<think>6 * 7 = 41</think>no, wait</think>The answer is 42.", "42", True),  # two closes: after the last
    ("<think>6 * 7</think>42</think>so 41", "42", False),
    ("<think>6 * 7</think>The answer is 42</think>let me check", "42", False),  # nothing after the last close
    ("<think>6 * 7 = 42", "42", True),  # no close: the whole reply is the answer
    ("0.5", "1/2", True),
    ("1/2", "0.5", True),
    ("The answer is 3.0", "3", True),
    ("1,000", "1000", True),
    ("3,4", "34", False),  # not a thousands group: two numbers, the last is 4
    ("It costs $3.50.", "3.5", True),
    ("-7", "-7", True),
    ("The answer is -7.", "7", False),
    ("42 apples", "42", True),  # units after the number
    ("12 km in all, so 7 km are left", "7", True),
    ("#### 42 dollars", "42", True),  # GSM8K's marker
    ("\\boxed{42}, then 43 more", "42", True),  # MATH's box wins over later numbers
    ("2/3", "0.67", False),  # exact fractions, no tolerance
    ("no number at all", "42", False),
    ("", "42", False),
]
COMPLETIONS = [c for c, _, _ in CASES]
REFERENCES = [r for _, r, _ in CASES]
EXPECTED = [v for _, _, v in CASES]


def test_is_correct_gives_the_hand_written_verdicts():
    assert [is_correct(c, r) for c, r, _ in CASES] == EXPECTED


def test_accepted_number_formats_read_as_exact_fractions():
    assert as_number("0.5") == as_number("1/2") == as_number("2/4")
    assert as_number("1,000") == as_number("1000.00") == 1000 and as_number("$3.50.") == as_number("7/2")
    assert as_number("-3/4") == -0.75 and as_number("apples") is None and as_number("1/0") is None
    assert extract_answer("<think>9</think>so 10") == "10" and extract_answer("<think>9</think>") is None


def test_grpo_reward_agrees():
    assert math_answer(None, COMPLETIONS, None, answer=REFERENCES) == [float(v) for v in EXPECTED]


def test_generative_eval_agrees():
    # score_generative judges each sample with quasi_exact_match and the task's `extract` (GSM8K's)
    assert [quasi_exact_match(c, r, extract="last_number") for c, r in zip(COMPLETIONS, REFERENCES)] == EXPECTED


def test_preference_verification_agrees():
    assert [preference_gen._passes("math", {"answer": r}, c) for c, r in zip(COMPLETIONS, REFERENCES)] == EXPECTED


def test_chat_evals_agree(monkeypatch):
    """chat_evals' accuracy, with the generator replaced by the cases' completions."""
    def prompts(split, count, seed, mode):
        return [{"messages": [{"role": "user", "content": "?"}], "answer": r} for r in REFERENCES[:count]]

    def replies(model, tokenizer, prompts, limit, batch_size):
        return [{"text": c, "tokens": 1, "stopped": True} for c in COMPLETIONS[: len(prompts)]]

    monkeypatch.setattr(chat_eval, "arithmetic_prompts", prompts)
    monkeypatch.setattr(chat_eval, "generate_replies", replies)
    monkeypatch.setattr(chat_eval, "has_reasoning_modes", lambda tokenizer: True)
    details: list = []
    chat_eval.chat_evals(None, None, count=len(CASES), persona_count=0, details=details)
    for name in ("no_think", "think"):
        assert [d["correct"] for d in details if d["set"] == name] == EXPECTED


@pytest.mark.parametrize("case", range(len(CASES)))
def test_grpo_pass_at_1_agrees(monkeypatch, case):
    """GRPOObjective.evaluate's greedy pass@1 on one prompt, with generation replaced by the case's
    completion (token ids [case, end]; the tokenizer decodes [case] to the completion)."""
    end = len(CASES)
    samples = SimpleNamespace(tokens=[[case, end]], finished=[True], completion_ids=[[case, end]], truncated=[False])
    monkeypatch.setattr(grpo_train, "encode", lambda tokenizer, item: [0])
    monkeypatch.setattr(grpo_train, "sample", lambda *args, **kwargs: samples)
    monkeypatch.setattr(grpo_train, "generate_rollouts", lambda *args, **kwargs: samples)
    grpo = SimpleNamespace(max_prompt_length=8, max_completion_length=8, temperature=1.0, top_k=0, top_p=1.0,
                           pass_k=1, chat_evals=False)
    objective = SimpleNamespace(
        config=SimpleNamespace(grpo=grpo, train=SimpleNamespace(seed=0)),
        ctx=SimpleNamespace(dp_rank=0, dp_world=1, device=torch.device("cpu")),
        tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(COMPLETIONS[i] for i in ids)),
        eval_prompts=[{"answer": REFERENCES[case]}], stop_tokens=[end], lockstep=None)
    objective._decode = lambda ids, truncated: grpo_train.GRPOObjective._decode(objective, ids, truncated)
    result = grpo_train.GRPOObjective.evaluate(objective, torch.nn.Linear(1, 1))["grpo"]
    assert result["pass@1"] == result["mean@1"] == float(EXPECTED[case])
