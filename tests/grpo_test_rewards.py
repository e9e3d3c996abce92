"""User reward functions (module:function, TRL's signature) for the GRPO tests: rewards that vary on
the completions of a random model, so advantages are not all zero. With conversational prompts a
completion arrives as TRL passes it, [{"role": "assistant", "content": text}]."""


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def digit_share(prompts, completions, completion_ids, **columns):
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def short_answers(prompts, completions, completion_ids, answer, **columns):
    """Needs the `answer` column: 1 for a completion shorter than 8 tokens that contains the answer."""
    return [float(len(ids) < 8 and a in _text(c)) for c, ids, a in zip(completions, completion_ids, answer)]


def broken(prompts, completions, **columns):
    raise ZeroDivisionError("division by zero")
