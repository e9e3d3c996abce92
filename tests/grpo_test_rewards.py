"""User reward functions (module:function, TRL's signature) for the GRPO tests: rewards that vary on
the completions of a random model, so advantages are not all zero."""


def digit_share(prompts, completions, completion_ids, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def short_answers(prompts, completions, completion_ids, answer, **columns):
    """Needs the `answer` column: 1 for a completion shorter than 8 tokens that contains the answer."""
    return [float(len(ids) < 8 and a in c) for c, ids, a in zip(completions, completion_ids, answer)]


def broken(prompts, completions, **columns):
    raise ZeroDivisionError("division by zero")
