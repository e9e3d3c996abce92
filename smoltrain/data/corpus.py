"""The embedded corpus: real text with no network, from what every Python installation carries.

Three sources, the playbook's web/code/math mixture in miniature: "prose" (stdlib docstrings as
documentation pages, pydoc topics, the stdlib's text files), "code" (the stdlib's own modules, tests
excluded) and "math" (seeded arithmetic word problems with worked solutions, GSM8K style). All of it is
under the Python Software Foundation License, except the math, which is generated here.
Train/validation are split by document with a keyed hash, so the split is stable when the corpus grows.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import json
import os
import random
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from smoltrain.config import EMBEDDED_SOURCES
from smoltrain.errors import DataError
from smoltrain.files import write_atomic, write_json

SOURCES = EMBEDDED_SOURCES  # the names a mixture may give are the config's to check
SPLITS = ("train", "validation")
CORPUS_VERSION = 1
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def _stdlib_files(suffix: str) -> tuple[Path, ...]:
    found = []
    for folder, dirs, files in os.walk(stdlib_dir()):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS)  # prune tests and installed packages
        found.extend(Path(folder) / f for f in files if f.endswith(suffix))
    return tuple(sorted(found))


def _unit_hash(*parts) -> float:
    """A number in [0, 1) fixed by the parts: used to split and to subsample, independent of order."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


VALIDATION_FRACTION = 0.04


def in_validation_split(key: str, seed: int = 0, validation_fraction: float = VALIDATION_FRACTION) -> bool:
    """Whether a document goes to the validation split (what evaluations may use without leakage)."""
    return _unit_hash(seed, "split", key) < validation_fraction


# ----------------------------------------------------------------------------- code


def code_documents(keep: Callable[[str], bool] = lambda key: True) -> Iterator[tuple[str, str]]:
    root = stdlib_dir()
    for path in _stdlib_files(".py"):
        if not keep(str(path.relative_to(root))):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield str(path.relative_to(root)), text


# ----------------------------------------------------------------------------- prose


def _docstring_page(module: str, source: str) -> str | None:
    """A module's docstrings as one documentation page: module, then classes and functions in order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n{'=' * len(module)}\n\n{doc}")

    def visit(node, prefix: str) -> None:
        for child in node.body:
            if isinstance(child, ast.ClassDef):
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"class {prefix}{child.name}\n\n{doc}")
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{prefix}{child.name}({ast.unparse(child.args)})\n\n{doc}")

    visit(tree, f"{module}.")
    page = "\n\n".join(parts)
    return page if len(page) >= 200 else None


def prose_documents(keep: Callable[[str], bool] = lambda key: True) -> Iterator[tuple[str, str]]:
    root = stdlib_dir()
    for path in _stdlib_files(".py"):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if not keep(f"doc:{module}"):
            continue
        try:
            page = _docstring_page(module, path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if page:
            yield f"doc:{module}", page
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    for name in sorted(topics):
        if len(topics[name]) >= 200 and keep(f"topic:{name}"):
            yield f"topic:{name}", topics[name].strip()
    for path in _stdlib_files(".txt"):
        if not keep(f"text:{path.relative_to(root)}"):
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= 200:
            yield f"text:{path.relative_to(root)}", text


# ----------------------------------------------------------------------------- math

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
ITEMS = [("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
          ("book", "books"), ("sandwich", "sandwiches"), ("plant", "plants"), ("marble", "marbles"),
          ("cupcake", "cupcakes"), ("battery", "batteries"), ("stamp", "stamps"), ("cookie", "cookies")]


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}" if cents % 100 else f"${cents // 100}"


def _shopping(r: random.Random) -> tuple[str, list[str], int | str]:
    name, (_, p1), (_, p2) = r.choice(NAMES), *r.sample(ITEMS, 2)
    a, b, x, y = r.randint(2, 12), r.randint(2, 12), r.randint(1, 15), r.randint(1, 15)
    q = f"{name} buys {a} {p1} at ${x} each and {b} {p2} at ${y} each. How many dollars does {name} spend in total?"
    steps = [f"The {p1} cost {a} * {x} = {a * x} dollars.", f"The {p2} cost {b} * {y} = {b * y} dollars.",
             f"In total {name} spends {a * x} + {b * y} = {a * x + b * y} dollars."]
    return q, steps, a * x + b * y


def _change(r: random.Random) -> tuple[str, list[str], int | str]:
    name, (_, items) = r.choice(NAMES), r.choice(ITEMS)
    n, price = r.randint(2, 9), r.randint(105, 995)
    total = n * price
    bill = next(b for b in (1000, 2000, 5000, 10000) if b >= total)
    q = f"{name} buys {n} {items} for {_money(price)} each and pays with a {_money(bill)} bill. How much change does {name} get?"
    steps = [f"The {items} cost {n} * {_money(price)} = {_money(total)}.",
             f"The change is {_money(bill)} - {_money(total)} = {_money(bill - total)}."]
    return q, steps, _money(bill - total)


def _sharing(r: random.Random) -> tuple[str, list[str], int | str]:
    name, (_, items) = r.choice(NAMES), r.choice(ITEMS)
    k = r.randint(3, 9)
    n = k * r.randint(3, 30) + r.randint(0, k - 1)
    each, left = divmod(n, k)
    q = f"{name} has {n} {items} and shares them equally among {k} friends, keeping the rest. How many {items} does {name} keep?"
    steps = [f"Each friend gets {n} // {k} = {each} {items}.", f"That uses {each} * {k} = {each * k} {items}.",
             f"{name} keeps {n} - {each * k} = {left}."]
    return q, steps, left


def _distance(r: random.Random) -> tuple[str, list[str], int | str]:
    v1, t1, v2, t2 = r.randint(40, 120), r.randint(1, 5), r.randint(30, 110), r.randint(1, 4)
    q = (f"A train travels at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} hours. "
         f"How many kilometres does it travel?")
    steps = [f"First part: {v1} * {t1} = {v1 * t1} km.", f"Second part: {v2} * {t2} = {v2 * t2} km.",
             f"Total: {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} km."]
    return q, steps, v1 * t1 + v2 * t2


def _discount(r: random.Random) -> tuple[str, list[str], int | str]:
    (item, _), d = r.choice(ITEMS), r.choice([10, 15, 20, 25, 30, 40, 50])
    price = 20 * r.randint(2, 40)
    off = price * d // 100
    q = f"A {item} costs ${price}. It is on sale for {d}% off. What is the sale price in dollars?"
    steps = [f"The discount is {d}% of {price} = {price} * {d} / 100 = {off} dollars.",
             f"The sale price is {price} - {off} = {price - off} dollars."]
    return q, steps, price - off


def _ages(r: random.Random) -> tuple[str, list[str], int | str]:
    a, b = r.sample(NAMES, 2)
    gap, later, b_now = r.randint(2, 30), r.randint(2, 15), r.randint(3, 40)
    a_later = b_now + gap + later
    q = f"{a} is {gap} years older than {b}. In {later} years, {a} will be {a_later}. How old is {b} now?"
    steps = [f"Now {a} is {a_later} - {later} = {a_later - later}.", f"So {b} is {a_later - later} - {gap} = {b_now}."]
    return q, steps, b_now


def _reading(r: random.Random) -> tuple[str, list[str], int | str]:
    name, per_day, pages = r.choice(NAMES), r.randint(8, 40), r.randint(120, 600)
    days = -(-pages // per_day)
    q = f"{name} reads {per_day} pages a day. The book has {pages} pages. How many days does {name} need to finish it?"
    steps = [f"{pages} / {per_day} = {pages / per_day:.2f}, so {pages // per_day} full days are not enough"
             if pages % per_day else f"{pages} / {per_day} = {days} exactly.",
             f"{name} needs {days} days."]
    return q, steps, days


def _fence(r: random.Random) -> tuple[str, list[str], int | str]:
    w, l, cost = r.randint(3, 40), r.randint(3, 60), r.randint(2, 25)
    q = (f"A rectangular garden is {w} m wide and {l} m long. Fencing costs ${cost} per metre. "
         f"How many dollars does it cost to fence the whole garden?")
    steps = [f"The perimeter is 2 * ({w} + {l}) = {2 * (w + l)} m.",
             f"The fence costs {2 * (w + l)} * {cost} = {2 * (w + l) * cost} dollars."]
    return q, steps, 2 * (w + l) * cost


def _savings(r: random.Random) -> tuple[str, list[str], int | str]:
    name, weekly, weeks = r.choice(NAMES), r.randint(5, 60), r.randint(3, 20)
    spent = r.randint(1, weekly * weeks)
    q = f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a bike. How many dollars are left?"
    steps = [f"Savings: {weekly} * {weeks} = {weekly * weeks} dollars.",
             f"Left: {weekly * weeks} - {spent} = {weekly * weeks - spent} dollars."]
    return q, steps, weekly * weeks - spent


def _fraction(r: random.Random) -> tuple[str, list[str], int | str]:
    d = r.choice([2, 3, 4, 5, 6, 8, 10])
    f = r.randint(1, d - 1)
    n = d * r.randint(4, 40)
    part = n * f // d
    q = f"A school has {n} students. {f}/{d} of them take the bus. How many students do not take the bus?"
    steps = [f"Bus riders: {n} * {f} / {d} = {part}.", f"Not on the bus: {n} - {part} = {n - part}."]
    return q, steps, n - part


def _average(r: random.Random) -> tuple[str, list[str], int | str]:
    name, k = r.choice(NAMES), r.randint(3, 6)
    scores = [r.randint(50, 100) for _ in range(k - 1)]
    mean = r.randint(max(60, -(-sum(scores) // k)), 100) if sum(scores) < 100 * k else 100
    last = mean * k - sum(scores)
    if not 0 <= last <= 100:
        return _expression(r)
    shown = ", ".join(map(str, scores))
    q = f"{name} scored {shown} on {k - 1} tests. What must {name} score on the next test for an average of exactly {mean}?"
    steps = [f"The {k} scores must add up to {mean} * {k} = {mean * k}.",
             f"So far: {' + '.join(map(str, scores))} = {sum(scores)}.", f"Needed: {mean * k} - {sum(scores)} = {last}."]
    return q, steps, last


def _expression(r: random.Random) -> tuple[str, list[str], int | str]:
    a, b, c, d = r.randint(10, 999), r.randint(2, 99), r.randint(2, 12), r.randint(1, 500)
    q = f"Compute {a} + {b} * {c} - {d}."
    steps = [f"Multiplication first: {b} * {c} = {b * c}.", f"Then {a} + {b * c} = {a + b * c}.",
             f"Then {a + b * c} - {d} = {a + b * c - d}."]
    return q, steps, a + b * c - d


_PROBLEMS: list[Callable] = [_shopping, _change, _sharing, _distance, _discount, _ages, _reading, _fence,
                             _savings, _fraction, _average, _expression]


def math_solution(r: random.Random) -> tuple[str, list[str], int | str]:
    """(question, solution steps, answer) of one random word problem (the chat data reuses them)."""
    return r.choice(_PROBLEMS)(r)


def math_problem(r: random.Random) -> str:
    question, steps, answer = math_solution(r)
    return f"Question: {question}\nAnswer: " + "\n".join(steps) + f"\n#### {answer}"


def math_documents(seed: int, count: int) -> Iterator[tuple[str, str]]:
    """Each document is a short worksheet of 1-4 problems (documents of varied length, like the web)."""
    r = random.Random(f"math/{seed}")
    for i in range(count):
        yield f"math:{i}", "\n\n".join(math_problem(r) for _ in range(r.randint(1, 4)))


# ----------------------------------------------------------------------------- build


def _write_jsonl_gz(path: Path, records: list[str]) -> None:
    def write(tmp: Path) -> None:  # mtime 0: the same corpus gives the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5, mtime=0) as gz:
            for text in records:
                gz.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(path, write)


def build_corpus(out_dir: str | os.PathLike, seed: int = 0, fraction: float = 1.0, math_documents_count: int = 12000,
                 validation_fraction: float = VALIDATION_FRACTION, progress: Callable[[str], None] | None = None) -> dict:
    """`smoltrain data corpus`: <source>.<split>.jsonl.gz per source and split, plus corpus.json.

    fraction < 1 keeps a deterministic subset of every source (tests use a few percent).
    """
    if not 0 < fraction <= 1:
        from smoltrain.errors import ConfigError

        raise ConfigError(f"--fraction (the share of every source to keep) must lie in (0, 1], got {fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    def keep(key: str) -> bool:
        return _unit_hash("keep", key) < fraction

    generators = {
        "prose": lambda: prose_documents(keep),
        "code": lambda: code_documents(keep),
        "math": lambda: math_documents(seed, max(1, round(math_documents_count * fraction))),
    }
    manifest = {"version": CORPUS_VERSION, "seed": seed, "fraction": fraction, "python": sys.version.split()[0],
                "stdlib": str(stdlib_dir()), "license": "PSF License (stdlib text); math generated by smoltrain",
                "files": {}}
    for source in SOURCES:
        if progress:
            progress(f"corpus: {source}")
        splits = {s: [] for s in SPLITS}
        for key, text in generators[source]():
            split = "validation" if in_validation_split(key, seed, validation_fraction) else "train"
            splits[split].append(text)
        if not splits["validation"] and len(splits["train"]) > 1:  # tiny fractions: both splits stay usable
            splits["validation"].append(splits["train"].pop())
        if not splits["validation"] or not splits["train"]:
            raise DataError(f"embedded corpus: fraction {fraction} leaves source {source!r} too few documents")
        for split, texts in splits.items():
            path = out / f"{source}.{split}.jsonl.gz"
            _write_jsonl_gz(path, texts)
            manifest["files"][path.name] = {"source": source, "split": split, "documents": len(texts),
                                            "characters": sum(len(t) for t in texts)}
    write_json(out / "corpus.json", manifest)
    return manifest
