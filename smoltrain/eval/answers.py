"""The one definition of a correct answer: GRPO's reward and pass@k, the chat evals and the generative
evals all call `is_correct`, so RL optimises exactly what the report card shows (nanochat's reward() is its evaluate()).

The answer is read after the LAST `</think>` (a think block's numbers never count, and a reply that
closes two blocks is judged on what follows the second), then compared as exact fractions.
"""

from __future__ import annotations

import re
from fractions import Fraction

THINK_CLOSE = "</think>"

# A number as people write answers: '-12', '1,000' (thousands groups of 3 only, so '3,4' is two numbers),
# '3.50', '1/2', '$3.50'. A leading '.5' or '1e3' is not read as a number.
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_answer(completion: str) -> str:
    """The text after the last `</think>`, stripped (all of the completion when it has none)."""
    return completion.rsplit(THINK_CLOSE, 1)[-1].strip()


def extract_answer(completion: str) -> str | None:
    """The answer a completion gives, read in its final answer: after the last '####' (GSM8K), else the
    last \\boxed{} (MATH), else the last number; None when there is none of these."""
    text = final_answer(completion)
    if "####" in text:
        tail = text.rsplit("####", 1)[-1].strip()
        if not tail:
            return None
        line = tail.splitlines()[0].strip()
        number = _NUMBER.match(line)  # '#### 42 dollars' -> '42'
        return number.group(0) if number else line
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    """An exact number from an answer string, or None. Accepted: integers ('-7'), thousands separators
    ('1,000'), decimals ('3.50', '3.0'), fractions ('1/2', '-3/4'), a leading '$' and a trailing '.'
    ('$3.50.'), so '0.5' == '1/2', '3.0' == '3', '1,000' == '1000'. Units and words are not numbers:
    extract_answer has already cut '42 apples' to '42'."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(given: str | None, reference) -> bool:
    """Exact numeric equality when both sides are numbers (see as_number); otherwise math-verify's
    symbolic equality when it is installed, else equal strings up to case and a trailing '.'."""
    if given is None or reference is None:
        return False
    reference = str(reference)
    a, b = as_number(given), as_number(reference)
    if a is not None and b is not None:
        return a == b
    try:
        import math_verify  # optional: symbolic answers (fractions in LaTeX, sets, intervals)
    except ImportError:
        return given.strip().lower().rstrip(".") == reference.strip().lower().rstrip(".")
    return bool(math_verify.verify(math_verify.parse(reference), math_verify.parse(given)))


def is_correct(completion: str, reference) -> bool:
    """Whether the answer `completion` gives (extract_answer) equals `reference` (answers_match)."""
    return answers_match(extract_answer(completion), reference)


__all__ = ["THINK_CLOSE", "answers_match", "as_number", "extract_answer", "final_answer", "is_correct"]
