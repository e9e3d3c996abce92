"""The embedded suite: four small tasks generated from a seed that a tiny model trained for a few
minutes on the embedded corpus (code + prose + arithmetic) moves on, each with its random baseline.

Arithmetic is scored both as cloze multiple choice and as exact-match generation; code-token
completion asks for the keyword or symbol Python's syntax forces; prose cloze asks for the last
word of a documentation sentence of the corpus' prose. The aggregate is nanochat's CORE-style centred score.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Iterable, Sequence

from smoltrain.eval.tasks import Task

SUITE = ("arithmetic_choice", "arithmetic_answer", "code_tokens", "prose_cloze")
DEFAULT_ITEMS = 200  # per task: about +-3.5 points of standard error at 50% accuracy


# ----------------------------------------------------------------------------- arithmetic


def _arithmetic_problem(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} * {b}", a * b
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b}", a - b
    return f"{a} + {b}", a + b


def _distinct_problems(rng: random.Random, count: int) -> list[tuple[str, int]]:
    # About 15k distinct problems exist (121 products), so a few thousand items stay distinct.
    problems, seen = [], set()
    while len(problems) < count:
        expression, answer = _arithmetic_problem(rng)
        if expression not in seen:
            seen.add(expression)
            problems.append((expression, answer))
    return problems


def arithmetic_prompt(expression: str) -> str:
    # The corpus' worked solutions write every step as "a op b = c", so the answer follows " =".
    return f"Question: Compute {expression}.\nAnswer: {expression} ="


def arithmetic_choice(seed: int, num_items: int = DEFAULT_ITEMS) -> Task:
    """Pick the result among the other operations' results on the same operands and near misses.

    No operand is ever a wrong choice: young models copy numbers from the context, which would
    put them below chance for a reason that has nothing to do with arithmetic. The other
    operations' results differ in magnitude (a sense a small model acquires first), the near
    misses (+-10, +-1) only in digits, so the task grades from "knows magnitudes" to "adds".
    """
    rng = random.Random(f"{seed}/arithmetic_choice")
    problems = _distinct_problems(random.Random(f"{seed}/arithmetic_choice/problems"), num_items)
    items = []
    for expression, answer in problems:
        a, op, b = expression.split()
        a, b = int(a), int(b)
        others = {a + b, abs(a - b), a * b} - {answer}
        near = [answer + 10, answer - 10, answer + 1, answer - 1]
        distractors = sorted(x for x in others if x >= 0)
        distractors += [x for x in near if x >= 0 and x != answer and x not in distractors]
        choices = [answer] + distractors[:3]
        rng.shuffle(choices)
        items.append({
            "id": f"arithmetic_choice/{len(items)}",
            "query": arithmetic_prompt(expression),
            "choices": [f" {c}" for c in choices],
            "gold": choices.index(answer),
        })
    return Task(name="arithmetic_choice", kind="multiple_choice", items=items, main_metric="acc")


def arithmetic_answer(seed: int, num_items: int = DEFAULT_ITEMS) -> Task:
    """Write the result: greedy decoding, quasi-exact match, random baseline 0."""
    rng = random.Random(f"{seed}/arithmetic_answer")
    items = []
    for i, (expression, answer) in enumerate(_distinct_problems(rng, num_items)):
        items.append({"id": f"arithmetic_answer/{i}", "query": arithmetic_prompt(expression), "answer": str(answer), "stop": [".", "\n"]})
    return Task(name="arithmetic_answer", kind="generative", items=items, max_new_tokens=8, random_baseline=0.0)


# ----------------------------------------------------------------------------- code tokens

_NAMES = ("data", "items", "value", "result", "path", "name", "key", "line", "count", "index", "total", "text",
          "node", "parts", "config", "entry", "record", "buffer", "options", "values")
_FUNCTIONS = ("parse", "load", "update", "process", "collect", "render", "handle", "build", "read", "check")
_CLASSES = ("Parser", "Reader", "Node", "Handler", "Config", "Record", "Buffer", "Entry", "Table", "Cache")
_MODULES = ("os", "sys", "re", "json", "collections", "itertools", "functools", "pathlib")
_KEYWORDS = (" in", " is", " as", " import", " from", " else", " return", " None", " if", " for", " class", " def")
_SYMBOL_ENDINGS = (":", ";", ",", ".")
_METHODS = (".append", ".split", ".strip", ".lower", ".keys", ".items", ".encode", ".join", ".upper")

# Each snippet marks the text Python's syntax or its strongest idiom asks for with <<...>> and
# names the pool of wrong choices (None: the same punctuation ending in another symbol). Every
# answer starts with a space or punctuation right after a letter (or after punctuation for a
# spaced keyword): a point where byte-level pre-tokenisers (GPT-2's and Llama-3's) always split, so
# the answer's tokens are the same alone as after the context and the scores are comparable.
_SNIPPETS: tuple[tuple[str, Sequence[str] | None], ...] = (
    ("def {f}({a}):\n    {r} = []\n    for {v}<< in>> {a}:", _KEYWORDS),
    ("def {f}({a}):\n    return [{v} for {v}<< in>> {a}]", _KEYWORDS),
    ("def {f}(path):\n    with open(path)<< as>> f:", _KEYWORDS),
    ("def {f}({a}, {b}=None):\n    if {b}<< is>> None:", _KEYWORDS),
    ("import {n}\nfrom {m}<< import>> {C}", _KEYWORDS),
    ("def {f}({a}):\n    if not {a}:\n        return<< None>>", _KEYWORDS),
    ("def {f}({a}):\n    try:\n        {v} = int({a})\n    except<< ValueError>>:",
     (" import", " return", " class", " def", " from", " else")),
    ("class {C}:\n    def {f}<<(self>>, {a}):", ("(None", "(True", "(import", "(return", "(class")),
    ("class {C}:\n    def __init__(self, {a}):\n        self.{a}<< =>> {a}", (" import", " return", " class", " def")),
    ("def {f}({a}):\n    {r} = []\n    for {v} in {a}:\n        {r}<<.append>>({v})", _METHODS),
    ("import os\n\n\ndef {f}({a}, {b}):\n    return os.path<<.join>>({a}, {b})", _METHODS),
    ("def {f}({a}):\n    for {v} in range(len({a}<<)):>>", None),
    ("class {C}({D}<<):>>", None),
    ("def {f}({a}, {b}<<):>>", None),
    ("def {f}({a}):\n    {r} = {{}}\n    for {v}, {w} in {a}.items<<():>>", None),
    ("if __name__ == \"__main<<__\":>>", None),
    ("def {f}({a}):\n    while {a}<<:>>", None),
    ("def {f}({a}):\n    print({v}<<)>>", (":", ";", "]", "}")),
)


def code_tokens(seed: int, num_items: int = DEFAULT_ITEMS) -> Task:
    """Choose the token that completes a Python line (a keyword, `self`, a method or a symbol)."""
    rng = random.Random(f"{seed}/code_tokens")
    items, seen = [], set()
    attempts = 0
    while len(items) < num_items and attempts < 50 * num_items:
        attempts += 1
        template, pool = _SNIPPETS[rng.randrange(len(_SNIPPETS))]
        a, b, v, w, r = rng.sample(_NAMES, 5)
        m, n = rng.sample(_MODULES, 2)
        c, d = rng.sample(_CLASSES, 2)
        text = template.format(f=rng.choice(_FUNCTIONS), a=a, b=b, v=v, w=w, r=r, m=m, n=n, C=c, D=d)
        context, rest = text.split("<<", 1)
        gold = rest.split(">>", 1)[0]
        if (context, gold) in seen:
            continue
        seen.add((context, gold))
        if pool is None:  # swap the last symbol: "):" against "),", ");", ")."
            pool = [gold[:-1] + end for end in _SYMBOL_ENDINGS]
        choices = [gold] + rng.sample([p for p in pool if p != gold], 3)
        rng.shuffle(choices)
        items.append({"id": f"code_tokens/{len(items)}", "query": context, "choices": choices, "gold": choices.index(gold)})
    return Task(name="code_tokens", kind="multiple_choice", items=items, main_metric="acc")


# ----------------------------------------------------------------------------- prose cloze

_SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")
_PLAIN_SENTENCE = re.compile(r"^[A-Z][A-Za-z ,;'()-]+ [a-z]{3,}\.$")


def prose_paragraphs(documents: Iterable[str]) -> list[str]:
    """Plain-prose paragraphs of documents, each joined onto one line (headings, indented code,
    grammar and tables are skipped)."""
    paragraphs = []
    for document in documents:
        for block in document.split("\n\n"):
            lines = block.strip("\n").split("\n")
            if any(line.startswith((" ", "*", "=", "-", "+", "|", ">>>")) for line in lines):
                continue
            paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


@functools.lru_cache(maxsize=1)
def prose_source() -> tuple[str, ...]:
    """Paragraphs of the embedded corpus' held-out prose (validation-split stdlib docstrings and
    documentation topics, so a model trained on the corpus never saw them), or, without the data
    package, of the documentation topics alone; in a fixed order."""
    try:
        from smoltrain.data.corpus import in_validation_split, prose_documents
    except ImportError:
        from pydoc_data.topics import topics

        return tuple(prose_paragraphs(topics[key] for key in sorted(topics)))
    return tuple(prose_paragraphs(text for _, text in prose_documents(in_validation_split)))


def prose_sentences(paragraphs: Sequence[str], min_words: int = 8, max_words: int = 40) -> list[str]:
    """Plain sentences (letters and light punctuation, ending in a word of 3+ letters), deduplicated."""
    out, seen = [], set()
    for paragraph in paragraphs:
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if sentence in seen or not _PLAIN_SENTENCE.match(sentence):
                continue
            if min_words <= len(sentence.split()) <= max_words:
                seen.add(sentence)
                out.append(sentence)
    return out


def prose_cloze(seed: int, num_items: int = DEFAULT_ITEMS, paragraphs: Sequence[str] | None = None) -> Task:
    """Complete a documentation sentence with its last word; the wrong choices end other sentences."""
    if paragraphs is None:
        paragraphs = prose_source()
    sentences = prose_sentences(paragraphs)
    rng = random.Random(f"{seed}/prose_cloze")
    chosen = rng.sample(sentences, min(num_items, len(sentences)))
    # Wrong answers are drawn with the same frequencies as right ones (other sentences' last
    # words, repeats kept), so an untrained model's expected accuracy is the 1/4 baseline.
    endings = [s.rsplit(" ", 1)[1][:-1] for s in sentences]
    items = []
    for sentence in chosen:
        context, last = sentence[:-1].rsplit(" ", 1)
        wrong: list[str] = []
        while len(wrong) < 3:
            word = rng.choice(endings)
            if word != last and word not in wrong:
                wrong.append(word)
        choices = [f" {w}" for w in [last] + wrong]
        rng.shuffle(choices)
        items.append({"id": f"prose_cloze/{len(items)}", "query": context, "choices": choices, "gold": choices.index(f" {last}")})
    return Task(name="prose_cloze", kind="multiple_choice", items=items, main_metric="acc_norm_nospace")


# ----------------------------------------------------------------------------- suite

BUILDERS = {"arithmetic_choice": arithmetic_choice, "arithmetic_answer": arithmetic_answer,
            "code_tokens": code_tokens, "prose_cloze": prose_cloze}


def embedded_task(name: str, seed: int = 0, num_items: int = DEFAULT_ITEMS) -> Task:
    return BUILDERS[name](seed, num_items)


def embedded_suite(seed: int = 0, num_items: int = DEFAULT_ITEMS) -> list[Task]:
    return [embedded_task(name, seed, num_items) for name in SUITE]


def centred(score: float, baseline: float) -> float:
    """(score - baseline) / (1 - baseline): 0 at chance, 1 at perfect (nanochat's CORE)."""
    if baseline >= 1.0:
        return 0.0
    return (score - baseline) / (1.0 - baseline)


def aggregate(results: dict[str, dict]) -> dict:
    """Mean main metric, mean baseline and mean centred score over tasks that report them."""
    scored = [r for r in results.values() if "centred" in r]
    if not scored:
        return {}
    mean = lambda key: sum(r[key] for r in scored) / len(scored)  # noqa: E731
    return {"centred": mean("centred"), "score": mean("score"), "random_baseline": mean("random_baseline"), "tasks": len(scored)}
