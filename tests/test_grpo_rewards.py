"""Reward plug-ins: each built-in against values worked out by hand, the weighted sum, None, and the
one-line errors for user functions that break the contract."""

import sys
import types

import pytest

from smoltrain.errors import ConfigError
from smoltrain.eval.answers import extract_answer
from smoltrain.post.rl.rewards import (
    RewardError,
    build_rewards,
    format_reward,
    length_group_reward,
    math_answer,
    overlong_reward,
    score,
)


def test_math_answer_reads_the_final_answer_the_way_gsm8k_writes_it():
    completions = [
        "3 * 4 = 12. Then 12 + 5 = 17.\n#### 17",  # GSM8K marker
        "The change is $10 - $6.50 = $3.50.",  # last number, with $ and a trailing dot
        "<think>maybe 40?</think>The answer is \\boxed{41}",  # boxed, after the think block
        "I think it is 1,250 in all",  # thousands separator
        "no number at all",
        "#### 18",  # wrong
    ]
    answers = ["17", "$3.50", "41", "1250", "3", "17"]
    assert math_answer(None, completions, None, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert extract_answer("<think>the answer is 9</think>so 10") == "10"  # thinking is not the answer
    assert math_answer(None, ["5"], None, answer=[None]) == [None]  # a row without a reference


def test_format_checks_the_think_block_for_each_mode():
    fmt = format_reward("no_think")
    # no_think: the empty block is already in the generation prompt, so no tags at all
    no_think = ["The answer is 4.", "<think>\n\n</think>\nThe answer is 4.", "<think>2+2</think>4", ""]
    assert fmt(None, no_think, None) == [1.0, 0.0, 0.0, 0.0]
    think = ["<think>2 + 2 = 4</think>The answer is 4.", "2 + 2 = 4</think>4", "<think>a</think><think>b</think>4",
             "<think>only thinking</think>", "4"]
    assert fmt(None, think, None, mode=["think"] * len(think)) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_overlong_is_the_dapo_soft_penalty_on_token_counts():
    overlong = overlong_reward(max_len=10, cache=4)
    ids = [[0] * n for n in (3, 6, 7, 9, 10, 11)]
    assert overlong(None, [""] * 6, ids) == pytest.approx([0, 0, -1 / 4, -3 / 4, -1, -1])
    with pytest.raises(ConfigError, match="overlong_cache"):
        overlong_reward(max_len=10, cache=11)


def test_length_group_is_kimis_per_group_length_reward():
    reward = length_group_reward(group_size=3)
    ids = [[0] * n for n in (10, 20, 30, 5, 5, 5)]
    completions = ["#### 1", "#### 2", "#### 1", "#### 1", "#### 1", "#### 2"]
    answers = ["1"] * 6
    # group 1: lambda = 0.5, 0, -0.5; correct keeps lambda, wrong gets min(0, lambda); group 2: equal lengths
    assert reward(None, completions, ids, answer=answers) == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])


def test_rewards_are_summed_with_weights_and_logged_one_by_one():
    rewards = build_rewards({"math_answer": 1.0, "overlong": 0.5}, group_size=2, overlong_max_len=4, overlong_cache=2)
    completions, ids = ["#### 7", "#### 8"], [[1, 2, 3], [1, 2, 3, 4, 5]]
    scores = score(rewards, ["q", "q"], completions, ids, {"answer": ["7", "7"]})
    assert scores.per_function == {"math_answer": [1.0, 0.0], "overlong": [-0.5, -1.0]}
    assert scores.total.tolist() == pytest.approx([1.0 - 0.25, 0.0 - 0.5])
    assert scores.scorable.tolist() == [True, True]


@pytest.fixture
def user_module():
    module = types.ModuleType("grpo_user_rewards")

    def tag_count(prompts, completions, completion_ids, topic, **kwargs):  # TRL's signature, a column by name
        return [float(c.count("!")) if t == "fun" else None for c, t in zip(completions, topic)]

    def raises(prompts, completions, **kwargs):
        raise KeyError("answer")

    def short(prompts, completions, **kwargs):
        return [1.0]

    def bad_value(prompts, completions, **kwargs):
        return ["yes"] * len(completions)

    for f in (tag_count, raises, short, bad_value):
        setattr(module, f.__name__, f)
    sys.modules["grpo_user_rewards"] = module
    yield module
    del sys.modules["grpo_user_rewards"]


def test_user_function_gets_columns_and_none_leaves_a_completion_unscored(user_module):
    rewards = build_rewards({"grpo_user_rewards:tag_count": 2.0}, group_size=2)
    scores = score(rewards, ["a", "b"], ["hi!!", "hey!"], [[1], [2]], {"topic": ["fun", "dull"]})
    assert scores.per_function["grpo_user_rewards:tag_count"] == [2.0, None]
    assert scores.total.tolist() == [4.0, 0.0] and scores.scorable.tolist() == [True, False]


@pytest.mark.parametrize("name, message", [
    ("raises", r"^reward function 'grpo_user_rewards:raises' raised KeyError: 'answer'$"),
    ("short", r"^reward function 'grpo_user_rewards:short' returned 1 values for 2 completions"),
    ("bad_value", r"^reward function 'grpo_user_rewards:bad_value' returned 'yes' at index 0"),
])
def test_a_broken_reward_function_is_one_line_naming_it(user_module, name, message):
    rewards = build_rewards({f"grpo_user_rewards:{name}": 1.0}, group_size=2)
    with pytest.raises(RewardError, match=message) as info:
        score(rewards, ["a", "b"], ["x", "y"], [[1], [2]], {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_reward", "neither a built-in"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("grpo_user_rewards:missing", "has no function 'missing'"),
])
def test_unknown_reward_names_are_config_errors(user_module, spec, message):
    with pytest.raises(ConfigError, match=message):
        build_rewards({spec: 1.0}, group_size=2)
    with pytest.raises(ConfigError, match="overlong_max_len"):
        build_rewards({"overlong": 1.0}, group_size=2)
