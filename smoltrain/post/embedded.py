"""Embedded chat data: seeded conversations built offline from what the embedded corpus already has.

Four sources, so a fresh clone can run SFT and every chat eval: "arithmetic" (small-number word
problems a model of a few million parameters can learn, and the corpus's multi-step word problems,
which it mostly cannot; a step-by-step trace in <think> in think mode, the answer alone in no_think
mode),
"persona" (system prompts with rules a program can check: capital letters, a fixed last word,
reply-length limits), "stdlib" (what a standard-library function does, from its docstring) and
"multiturn" (chats that switch mode mid-way with a trailing /think or /no_think). Items are split
into train and held-out by a keyed hash of the question, so the evals (and the preference and RL
stages, through `arithmetic_prompts`) never see a training question.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import re
import shutil
import sys
import uuid
from pathlib import Path

from smoltrain.data.corpus import ITEMS, NAMES, code_documents, in_validation_split, math_solution
from smoltrain.eval.answers import final_answer
from smoltrain.files import write_json
from smoltrain.post.chat.data import Conversation, write_conversations

CHAT_DATA_VERSION = 2
HELDOUT_FRACTION = 0.1
SOURCES = ("arithmetic", "persona", "stdlib", "multiturn")
# Arithmetic first: what the chat evals measure and a small model can learn; stdlib answers (docstring
# sentences) mostly teach the format (measured 2026-11-29, LOG.md). Rules in the system prompt get a
# tenth: SFT teaches what a rule looks like, preference training to keep it, as in SmolLM3. With 0.3,
# SFT kept 37-91% of the rules depending on its steps, and APO-zero had nothing left to move (LOG.md).
MIXTURE = {"arithmetic": 0.56, "persona": 0.1, "stdlib": 0.17, "multiturn": 0.17}
# Share of the arithmetic items that are small-number problems (one step, operands up to 9): the
# demo's 1.7M-parameter model learns those in a few SFT minutes, so accuracy has room to move through
# SFT, APO and GRPO; the rest are the corpus's multi-step problems (SmolLM3's AIME in miniature).
SMALL_SHARE = 0.8
STDLIB_MODULE_SHARE = 0.35  # of stdlib modules read for questions: ~1.5k functions, parsed in ~2 s


def _split(key: str, seed: int) -> str:
    return "heldout" if in_validation_split(f"chat:{key}", seed, HELDOUT_FRACTION) else "train"


# ----------------------------------------------------------------------------- arithmetic


def small_problem(r: random.Random) -> tuple[str, list[str], int]:
    """(question, steps, answer) of a one-step problem on numbers up to 9 (answers 0-18)."""
    name, (_, items) = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(1, 9), r.randint(1, 9)
    if r.random() < 0.5:
        question = r.choice([f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
                             f"What is {a} plus {b}?", f"There are {a} {items} in a box and {b} on a shelf. How many {items} are there?"])
        return question, [f"{a} + {b} = {a + b}."], a + b
    a += b  # a - b with a result of 0-9
    question = r.choice([f"{name} has {a} {items} and gives {b} away. How many {items} does {name} have left?",
                         f"What is {a} minus {b}?", f"There were {a} {items}. {name} took {b}. How many {items} are left?"])
    return question, [f"{a} - {b} = {a - b}."], a - b


def arithmetic_items(split: str, count: int, seed: int = 0) -> list[dict]:
    """The first `count` word problems of a split: {"question", "steps", "answer", "kind"} (answer a
    string; kind "small" or "multistep", drawn with SMALL_SHARE)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    r = random.Random(f"chat-math/{seed}")
    items, seen = [], set()
    while len(items) < count:
        kind = "small" if r.random() < SMALL_SHARE else "multistep"
        question, steps, answer = small_problem(r) if kind == "small" else math_solution(r)
        if question in seen or _split(question, seed) != split:
            continue
        seen.add(question)
        items.append({"question": question, "steps": steps, "answer": str(answer), "kind": kind})
    return items


def think_response(steps: list[str], answer: str) -> str:
    return "<think>\n" + "\n".join(steps) + "\n</think>\n" + f"The answer is {answer}."


def direct_response(answer: str) -> str:
    return f"The answer is {answer}."


def arithmetic_prompts(split: str = "heldout", count: int = 100, seed: int = 0, mode: str = "no_think") -> list[dict]:
    """Prompts with reference answers for evals, preference pairs and RL rewards:
    {"messages": [user], "chat_template_kwargs": {"enable_thinking"}, "answer", "question", "steps"}."""
    if mode not in ("think", "no_think"):
        raise ValueError(f"mode must be think or no_think, got {mode!r}")
    return [{"messages": [{"role": "user", "content": item["question"]}],
             "chat_template_kwargs": {"enable_thinking": mode == "think"}, **item}
            for item in arithmetic_items(split, count, seed)]


# ----------------------------------------------------------------------------- rules a program can check

_END_WORDS = ["banana", "cheers", "onward", "indeed"]
_START_WORDS = ["Certainly", "Okay", "Well"]


def rules() -> list[dict]:
    """Every checkable system-prompt rule: {"id", "system"}; `follows_rule` checks a reply."""
    out = [{"id": "caps", "system": "Answer in capital letters only."},
           {"id": "lower", "system": "Answer in lowercase letters only."}]
    out += [{"id": f"end:{w}", "system": f"End every answer with the word {w}."} for w in _END_WORDS]
    out += [{"id": f"start:{w}", "system": f"Begin every answer with the word {w}."} for w in _START_WORDS]
    out += [{"id": f"max_words:{n}", "system": f"Reply in at most {n} words."} for n in (3, 5, 8)]
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:[.,'][^\W_]+)*", text)


def follows_rule(rule_id: str, response: str) -> bool:
    """Whether the final answer of `response` keeps the rule (the think block is free)."""
    text = final_answer(response)
    words = _words(text)
    if not words:
        return False
    kind, _, arg = rule_id.partition(":")
    if kind == "caps":
        return any(c.isalpha() for c in text) and text == text.upper()
    if kind == "lower":
        return any(c.isalpha() for c in text) and text == text.lower()
    if kind == "end":
        return words[-1].lower() == arg.lower()
    if kind == "start":
        return words[0].lower() == arg.lower()
    if kind == "max_words":
        return len(words) <= int(arg)
    raise ValueError(f"unknown rule {rule_id!r}")


def apply_rule(rule_id: str, answer: str, short: str) -> str:
    """A reply that keeps the rule; `short` is what to say when the limit leaves no room."""
    kind, _, arg = rule_id.partition(":")
    if kind == "caps":
        return answer.upper()
    if kind == "lower":
        return answer.lower()
    if kind == "end":
        return f"{answer.rstrip()} {arg.capitalize()}."
    if kind == "start":
        return f"{arg}, {answer[0].lower()}{answer[1:]}" if answer else arg
    if kind == "max_words":
        n = int(arg)
        if len(_words(answer)) <= n:
            return answer
        if len(_words(short)) <= n:
            return short
        return " ".join(answer.split()[:n]).rstrip(".,;:") + "."
    raise ValueError(f"unknown rule {rule_id!r}")


# ----------------------------------------------------------------------------- stdlib questions


def _first_sentence(doc: str, max_words: int = 30) -> str | None:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if not paragraph or len(paragraph) < 12 or not paragraph[0].isalpha():
        return None
    sentence = re.split(r"(?<=[.!?])\s", paragraph)[0]
    words = sentence.split()
    if len(words) > max_words:
        sentence = " ".join(words[:max_words]).rstrip(".,;:") + "."
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def stdlib_items(split: str, seed: int = 0, module_share: float = STDLIB_MODULE_SHARE) -> list[dict]:
    """{"name", "kind", "module", "answer"} for public stdlib functions and classes with a docstring."""
    return [dict(item) for item in _stdlib_items(split, seed, module_share)]


@functools.lru_cache(maxsize=8)
def _stdlib_items(split: str, seed: int, module_share: float) -> tuple[dict, ...]:
    def keep(key: str) -> bool:
        return int.from_bytes(hashlib.blake2b(f"chat-stdlib/{key}".encode(), digest_size=8).digest(), "little") / 2**64 < module_share

    items = []
    for key, source in code_documents(keep):
        module = ".".join(Path(key).with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            sentence = _first_sentence(doc) if doc else None
            name = f"{module}.{node.name}"
            if sentence and _split(name, seed) == split:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                items.append({"name": name, "kind": kind, "module": module, "answer": sentence})
    return tuple(items)


_STDLIB_QUESTIONS = ["What does {name} do?", "In Python, what is {name} for?", "Explain {name} briefly.",
                     "What is the {kind} {name} in the {module} module?"]


def _stdlib_turn(r: random.Random, item: dict) -> tuple[str, list[str], str]:
    question = r.choice(_STDLIB_QUESTIONS).format(**item)
    steps = [f"{item['name']} is a {item['kind']} in the {item['module']} module.", "Its documentation says what it does."]
    return question, steps, item["answer"]


# ----------------------------------------------------------------------------- conversations


def _mode_setting(r: random.Random, think: bool) -> tuple[list[dict], dict]:
    """The ways data sets a mode: enable_thinking, a flag as the whole system message, or the default."""
    way = r.random()
    if way < 0.5:
        return [], {"enable_thinking": think}
    if way < 0.8:
        return [{"role": "system", "content": "/think" if think else "/no_think"}], {}
    return ([], {}) if think else ([], {"enable_thinking": False})


def _reply(think: bool, steps: list[str], answer_text: str) -> str:
    return ("<think>\n" + "\n".join(steps) + "\n</think>\n" + answer_text) if think else answer_text


def _arithmetic_conversation(r: random.Random, item: dict) -> Conversation:
    think = r.random() < 0.5
    system, kwargs = _mode_setting(r, think)
    return Conversation(system + [{"role": "user", "content": item["question"]},
                                  {"role": "assistant", "content": _reply(think, item["steps"], direct_response(item["answer"]))}],
                        kwargs)


def _stdlib_conversation(r: random.Random, item: dict) -> Conversation:
    think = r.random() < 0.5
    system, kwargs = _mode_setting(r, think)
    question, steps, answer = _stdlib_turn(r, item)
    return Conversation(system + [{"role": "user", "content": question},
                                  {"role": "assistant", "content": _reply(think, steps, answer)}], kwargs)


def _persona_parts(r: random.Random, arithmetic: dict | None, stdlib: dict | None) -> tuple[str, list[str], str, str]:
    """(question, think steps, answer, short answer) on an arithmetic or a stdlib question, before any rule."""
    if arithmetic is not None:
        return arithmetic["question"], arithmetic["steps"], direct_response(arithmetic["answer"]), arithmetic["answer"]
    question, steps, answer = _stdlib_turn(r, stdlib)
    return question, steps, answer, stdlib["name"].rsplit(".", 1)[-1]


def _ruled(rule: dict, steps: list[str], answer: str, short: str) -> tuple[list[str], str]:
    """(think steps, reply) of an answer under `rule`."""
    return steps + [f"The rule: {rule['system']}"], apply_rule(rule["id"], answer, short)


def persona_turn(r: random.Random, rule: dict, arithmetic: dict | None, stdlib: dict | None) -> tuple[str, list[str], str]:
    """(question, think steps, reply keeping the rule) on an arithmetic or a stdlib question."""
    question, steps, answer, short = _persona_parts(r, arithmetic, stdlib)
    return (question, *_ruled(rule, steps, answer, short))


def _persona_conversation(r: random.Random, rule: dict, arithmetic: dict | None, stdlib: dict | None) -> Conversation:
    think = r.random() < 0.3
    question, steps, reply = persona_turn(r, rule, arithmetic, stdlib)
    if r.random() < 0.25:  # smoltalk2 style: the instructions in chat_template_kwargs, no system message
        system, kwargs = [], {"custom_instructions": rule["system"], "enable_thinking": think}
    else:
        flag = r.choice(["", " /think" if think else " /no_think"])
        system = [{"role": "system", "content": rule["system"] + flag}]
        kwargs = {} if flag else {"enable_thinking": think}
    return Conversation(system + [{"role": "user", "content": question},
                                  {"role": "assistant", "content": _reply(think, steps, reply)}], kwargs)


def _multiturn_conversation(r: random.Random, turns: list[tuple[str, list[str], str]]) -> Conversation:
    """Two or three turns; the mode switches at least once with a trailing flag on the user message."""
    think = r.random() < 0.5
    messages = []
    kwargs = {"enable_thinking": think}
    for i, (question, steps, answer) in enumerate(turns):
        if i > 0:
            think = not think if i == 1 or r.random() < 0.5 else think
            question = f"{question} {'/think' if think else '/no_think'}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": _reply(think, steps, answer)}]
    return Conversation(messages, kwargs)


def chat_conversations(split: str = "train", count: int = 8000, seed: int = 0) -> dict[str, list[Conversation]]:
    """`count` conversations of a split, by source (shares: MIXTURE)."""
    r = random.Random(f"chat/{split}/{seed}")
    counts = {s: round(count * w) for s, w in MIXTURE.items()}
    arithmetic = arithmetic_items(split, counts["arithmetic"] + counts["persona"] + 2 * counts["multiturn"], seed)
    stdlib = stdlib_items(split, seed)
    r.shuffle(stdlib)
    next_math = iter(arithmetic)
    rule_list = rules()

    def any_stdlib() -> dict:
        return stdlib[r.randrange(len(stdlib))]

    out = {s: [] for s in SOURCES}
    for _ in range(counts["arithmetic"]):
        out["arithmetic"].append(_arithmetic_conversation(r, next(next_math)))
    for i in range(counts["stdlib"]):
        out["stdlib"].append(_stdlib_conversation(r, stdlib[i % len(stdlib)]))
    for _ in range(counts["persona"]):
        rule = r.choice(rule_list)
        use_math = r.random() < 0.5
        out["persona"].append(_persona_conversation(r, rule, next(next_math) if use_math else None,
                                                    None if use_math else any_stdlib()))
    for _ in range(counts["multiturn"]):
        turns = []
        for _ in range(r.choice([2, 2, 3])):
            if r.random() < 0.6:
                item = next(next_math)
                turns.append((item["question"], item["steps"], direct_response(item["answer"])))
            else:
                turns.append(_stdlib_turn(r, any_stdlib()))
        out["multiturn"].append(_multiturn_conversation(r, turns))
    for source, conversations in out.items():
        for conv in conversations:
            conv.source = source
    return out


def _breaking_rule(rule_list: list[dict], i: int, answer: str, short: str) -> dict | None:
    """The first rule from half the list on (another kind of rule) whose reply breaks rule i's; None
    when every rule's reply keeps it (a short answer keeps "at most 8 words" under any rule)."""
    rule, half = rule_list[i % len(rule_list)], len(rule_list) // 2
    for k in range(half, half + len(rule_list)):
        other = rule_list[(i + k) % len(rule_list)]
        if other is not rule and not follows_rule(rule["id"], apply_rule(other["id"], answer, short)):
            return other
    return None


def persona_prompts(split: str = "heldout", count: int = 60, seed: int = 0, mode: str = "no_think") -> list[dict]:
    """Questions under a rule's system prompt: {"messages": [system, user], "chat_template_kwargs", "rule",
    "reference", "rule_breaking", "kind"}: a reply that keeps the rule (with its think block in think
    mode) and the same answer written under another rule, which breaks this one (a counterfactual
    rejected reply for preference pairs), and the "answer" of an arithmetic question; questions
    alternate between arithmetic and stdlib ("kind"), rules cycle through `rules()`."""
    r = random.Random(f"chat-persona/{split}/{seed}")
    arithmetic = arithmetic_items(split, count, seed)
    stdlib = stdlib_items(split, seed)
    rule_list = rules()
    think = mode == "think"
    prompts = []
    for i in range(count):
        rule = rule_list[i % len(rule_list)]
        use_math = i % 2 == 0 or not stdlib
        question, steps, answer, short = _persona_parts(r, arithmetic[i] if use_math else None,
                                                        None if use_math else stdlib[i % len(stdlib)])
        other = _breaking_rule(rule_list, i, answer, short)
        prompts.append({"messages": [{"role": "system", "content": rule["system"]}, {"role": "user", "content": question}],
                        "chat_template_kwargs": {"enable_thinking": think}, "rule": rule["id"],
                        "reference": _reply(think, *_ruled(rule, steps, answer, short)),
                        "rule_breaking": _reply(think, *_ruled(other, steps, answer, short)) if other else None,
                        "kind": "arithmetic" if use_math else "stdlib"})
        if use_math:
            prompts[-1]["answer"] = arithmetic[i]["answer"]
    return prompts


# ----------------------------------------------------------------------------- files (cached)


def chat_data_key(seed: int, count: int) -> str:
    settings = {"version": CHAT_DATA_VERSION, "python": sys.version.split()[0], "seed": seed, "count": count,
                "mixture": MIXTURE, "small": SMALL_SHARE, "heldout": HELDOUT_FRACTION, "stdlib_share": STDLIB_MODULE_SHARE}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ensure_embedded_chat(cache_dir: str | os.PathLike, seed: int = 0, count: int = 8000) -> list[str]:
    """`<source>.train.jsonl.gz` per source under cache_dir, built once (atomic rename); their paths."""
    cache = Path(cache_dir).expanduser()
    root = cache / f"chat-{chat_data_key(seed, count)}"
    if not (root / "chat.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".chat-{chat_data_key(seed, count)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            by_source = chat_conversations("train", count, seed)
            for source, conversations in by_source.items():
                write_conversations(tmp / f"{source}.train.jsonl.gz", conversations)
            write_json(tmp / "chat.json", {"version": CHAT_DATA_VERSION, "seed": seed, "count": count,
                                           "conversations": {s: len(c) for s, c in by_source.items()}})
            try:
                os.rename(tmp, root)
            except OSError:
                if not (root / "chat.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [str(root / f"{source}.train.jsonl.gz") for source in SOURCES]


__all__ = [
    "MIXTURE",
    "SOURCES",
    "apply_rule",
    "arithmetic_items",
    "arithmetic_prompts",
    "chat_conversations",
    "direct_response",
    "ensure_embedded_chat",
    "follows_rule",
    "persona_prompts",
    "rules",
    "small_problem",
    "stdlib_items",
    "think_response",
]
