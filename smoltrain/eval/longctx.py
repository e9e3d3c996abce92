"""Long-context evaluation, offline and seeded: RULER's synthetic tasks and passkey retrieval at a length
in tokens (`passkey@8192`), scored by generation like RULER, and validation loss by position.

Each item is fitted to its length with the model's own tokenizer: the haystack's size (sentences,
distractor needles, list words) is binary-searched so prompt + answer prefix + the task's generation
budget fit the length (RULER counts tokens_to_generate in max_seq_length). Templates, needles and the
string_match_all scorer are RULER's (NVIDIA/RULER scripts/data/synthetic, scripts/eval/synthetic/constants.py).
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from smoltrain.errors import ConfigError, DataError
from smoltrain.eval.scoring import encode, standard_error
from smoltrain.model.modes import evaluating

# RULER's noise haystack (also the passkey test's garbage).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
DEPTHS = [100 * i / 39 for i in range(40)]  # RULER's 40 evenly spaced needle depths, in percent

# Keys are adjective-noun pairs like RULER's (wonderwords); these lists are fixed so an item never
# depends on an installed package. 48 x 48 = 2304 keys: distractor needles rarely repeat one.
ADJECTIVES = ("ancient brave bright calm clever cold curious damp eager early elegant empty fancy fierce gentle giant "
              "glossy golden grumpy happy hollow humble icy jolly kind lazy little lively loud lucky mellow misty "
              "noisy odd plain proud quick quiet rapid rare royal rusty shiny silent sleepy smooth sour steady").split()
NOUNS = ("anchor apple badger basket beacon bicycle blanket bottle bridge candle canyon castle cherry cloud comet "
         "compass cookie dragon drum falcon feather forest garden glacier hammer harbor helmet island jacket kettle "
         "ladder lantern lemon meadow mirror needle orchard otter parrot pebble pepper piano pillow planet "
         "pocket river saddle").split()


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Needles:
    """One RULER needle-in-a-haystack configuration."""

    haystack: str  # noise (the repeated sentence), essay (real text), needle (distractor needles)
    keys: int = 1  # needles with distinct keys (RULER num_needle_k)
    values: int = 1  # values per key (num_needle_v)
    queries: int = 1  # keys asked for (num_needle_q)
    key_kind: str = "words"
    value_kind: str = "numbers"


NIAH = {
    "niah_single_1": Needles("noise"),
    "niah_single_2": Needles("essay"),
    "niah_single_3": Needles("essay", value_kind="uuids"),
    "niah_multikey_1": Needles("essay", keys=4),
    "niah_multikey_2": Needles("needle"),
    "niah_multikey_3": Needles("needle", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": Needles("essay", values=4),
    "niah_multiquery": Needles("essay", keys=4, queries=4),
}
TOKENS_TO_GENERATE = {**{name: 128 for name in NIAH}, "vt": 30, "cwe": 120, "passkey": 10}  # RULER's, landmark's
LONG_CONTEXT_TASKS = tuple(TOKENS_TO_GENERATE)


@dataclass
class LongContextTask:
    """`task@length`: items generated (with the tokenizer) when scored; the Task-like fields let the
    eval stage record and aggregate it like any generative task."""

    name: str
    task: str
    length: int
    num_items: int
    seed: int = 0
    haystack_text: str | None = None  # essay haystacks: user text, else the embedded corpus' prose
    answer_tokens: int | None = None  # generation budget; None: RULER's per task (128 for needles: slow on a CPU)
    kind: str = "long_context"
    metric: str = "ruler_match"
    baseline: float = 0.0
    num_fewshot: int = 0
    formulation: str = "cloze"
    items: list = field(default_factory=list)

    def __post_init__(self):
        self.items = list(range(self.num_items))

    @property
    def tokens_to_generate(self) -> int:
        return self.answer_tokens or TOKENS_TO_GENERATE[self.task]


def parse_long_context_spec(spec: str) -> tuple[str, int] | None:
    """("passkey", 8192) for `passkey@8192` (also `8k`), None for other specs; unknown tasks name the known ones."""
    match = re.fullmatch(r"([a-z0-9_]+)@(\d+)(k?)", spec.strip())
    if match is None:
        return None
    task, length = match[1], int(match[2]) * (1024 if match[3] else 1)
    if task not in LONG_CONTEXT_TASKS:
        raise ConfigError(f"unknown long-context task '{task}' in '{spec}' (known: {', '.join(LONG_CONTEXT_TASKS)})")
    if length < 256:
        raise ConfigError(f"'{spec}': a long-context length must be at least 256 tokens")
    return task, length


def long_context_task(spec: str, num_items: int, seed: int = 0, haystack_files: Sequence[str] = (),
                      answer_tokens: int | None = None) -> LongContextTask:
    task, length = parse_long_context_spec(spec)
    text = read_haystack_files(tuple(haystack_files)) if haystack_files else None
    return LongContextTask(name=f"{task}@{length}", task=task, length=length, num_items=num_items, seed=seed,
                           haystack_text=text, answer_tokens=answer_tokens)


@functools.lru_cache(maxsize=4)
def read_haystack_files(paths: tuple[str, ...]) -> str:
    parts = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"haystack file {path}: not found")
        parts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)
    if len(_sentences(text)) < 10:
        raise DataError(f"haystack files {', '.join(paths)}: fewer than 10 sentences of text")
    return text


@functools.lru_cache(maxsize=1)
def embedded_prose(max_chars: int = 600_000) -> str:
    """The embedded corpus' prose (stdlib documentation), the default essay haystack: all of it, not only
    the held-out split (93k characters, about 25k tokens: a 64k haystack would repeat it)."""
    from smoltrain.data.corpus import prose_documents

    parts, total = [], 0
    for _, text in prose_documents():
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.strip()) > 1]


@functools.lru_cache(maxsize=4)
def _essay_sentences(text: str) -> tuple[str, ...]:
    return tuple(_sentences(text))


@functools.lru_cache(maxsize=4)
def _corpus_words(text: str) -> tuple[str, ...]:
    """Distinct lower-case words of the haystack text (RULER's cwe samples words from a word list)."""
    seen = dict.fromkeys(w for w in re.findall(r"[a-z]{4,12}", text.lower()))
    return tuple(seen)


# ----------------------------------------------------------------------------- items


def _key(rng: random.Random, kind: str) -> str:
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _value(rng: random.Random, kind: str) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)) if kind == "uuids" else str(rng.randint(10**6, 10**7 - 1))


def _insert(units: list[str], inserts: list[str], depths: list[float]) -> list[str]:
    """`inserts` placed at fractions `depths` (sorted, 0..1) of the units, in order."""
    out, previous = [], 0
    for text, depth in zip(inserts, depths):
        at = round(depth * len(units))
        out += units[previous:at] + [text]
        previous = at
    return out + units[previous:]


def _niah(config: Needles, rng: random.Random, haystack: Callable[[int], list[str]], size: int) -> dict:
    """RULER niah.py's generate_input_output: needles, the haystack around them, the question."""
    kind = config.value_kind
    keys, values, needles = [], [], []
    for _ in range(max(config.keys, config.queries)):
        keys.append(_key(rng, config.key_kind))
        values.append([_value(rng, kind) for _ in range(config.values)])
        needles += [f"One of the special magic {kind} for {keys[-1]} is: {v}." for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(len(keys)), config.queries)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    if config.haystack == "needle":  # distractor needles with other keys and values, one per line
        units = [f"One of the special magic {kind} for {_key(rng, config.key_kind)} is: {_value(rng, kind)}."
                 for _ in range(size)]
    else:
        units = haystack(size)
    separator = " " if config.haystack == "essay" else "\n"
    context = separator.join(_insert(units, needles, [d / 100 for d in depths]))
    query_keys = [keys[i] for i in asked]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    template, prefix = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX
    noun = kind
    if config.queries * config.values == 1:  # RULER's singular form, made before the context goes in
        template, prefix = (t.replace("Some", "A").replace("are all", "is").replace("are", "is") for t in (template, prefix))
        noun = kind[:-1]
    template = template.format(type_needle_v=noun, context=context, query=query)
    prefix = prefix.format(type_needle_v=noun, query=query)
    return {"input": template, "answer_prefix": prefix, "outputs": [v for i in asked for v in values[i]],
            "depth": depths[0]}


def _variable_tracking(rng: random.Random, size: int, hops: int = 4) -> dict:
    """RULER variable_tracking.py, one chain of `hops` hops in the noise haystack (no one-shot example)."""
    names: list[str] = []
    while len(set(names)) < hops + 1:
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    depths = sorted(rng.random() for _ in chain)
    context = "\n".join(_insert([NOISE] * size, chain, depths))
    template = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above.")
    prefix = (" Answer: According to the chain(s) of variable assignment in the text above, "
              f"{hops + 1} variables are assigned the value {value}, they are: ")
    return {"input": template, "answer_prefix": prefix, "outputs": names, "depth": 100 * depths[0]}


def _common_words(rng: random.Random, words: Sequence[str], size: int, length: int) -> dict:
    """RULER common_words_extraction.py: 10 words 30x (6x under 4k tokens), `size` others 3x (1x), shuffled."""
    common_times, rare_times = (30, 3) if length >= 4096 else (6, 1)
    if 10 + size > len(words):
        raise DataError(f"cwe@{length}: the haystack text has only {len(words)} distinct words, too few for this length")
    chosen = rng.sample(list(words), min(len(words), 10 + size))
    common, rare = chosen[:10], chosen[10:]
    listed = common * common_times + rare * rare_times
    rng.shuffle(listed)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
    template = ("Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
    return {"input": template, "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
            "outputs": common, "depth": None}


def _passkey(rng: random.Random, size: int) -> dict:
    """Mohtashami & Jaggi's passkey test (landmark-attention run_test.py): a key in repeated garbage."""
    key = str(rng.randint(1, 50000))
    depth = rng.random()
    garbage = _insert([NOISE] * size, [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth])
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
            "I will quiz you about the important information there.\n" + " ".join(garbage) + "\nWhat is the pass key?")
    return {"input": text, "answer_prefix": " The pass key is", "outputs": [key], "depth": 100 * depth}


def _builder(task: LongContextTask, index: int) -> Callable[[int], dict]:
    """size -> item: the same draws for every size (a fresh generator per call), so the search is stable."""
    key = f"{task.seed}/{task.task}/{task.length}/{index}"
    text = task.haystack_text or embedded_prose()
    if task.task in NIAH:
        sentences = _essay_sentences(text)

        def haystack(size: int) -> list[str]:
            if NIAH[task.task].haystack == "noise":
                return [NOISE] * size
            return [sentences[i % len(sentences)] for i in range(size)]

        return lambda size: _niah(NIAH[task.task], random.Random(key), haystack, size)
    if task.task == "vt":
        return lambda size: _variable_tracking(random.Random(key), size)
    if task.task == "cwe":
        words = _corpus_words(text)
        return lambda size: _common_words(random.Random(key), words, size, task.length)
    return lambda size: _passkey(random.Random(key), size)


def fit_item(build: Callable[[int], dict], count_tokens: Callable[[str], int], budget: int) -> dict:
    """The item with the largest haystack whose prompt + answer prefix fits `budget` tokens (binary search)."""
    def tokens(size: int) -> int:
        item = build(size)
        return count_tokens(item["input"] + item["answer_prefix"])

    low, high = 1, 64
    while tokens(high) <= budget:  # grow until it no longer fits
        low, high = high, high * 2
        if high > 1 << 22:
            raise DataError("a long-context item never reaches its length: is the haystack text empty?")
    if tokens(low) > budget:
        raise ConfigError(f"the task's fixed text alone needs more than {budget} tokens: ask for a longer length")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tokens(middle) <= budget else (low, middle)
    item = build(low)
    item["haystack_units"] = low
    return item


def generate_items(task: LongContextTask, tokenizer) -> list[dict]:
    """RULER-shaped items (input, answer_prefix, outputs, length, depth) of `task`, each at most
    task.length tokens including the answer's generation budget."""
    budget = task.length - task.tokens_to_generate

    def count_tokens(text: str) -> int:
        return len(encode(tokenizer, text))

    items = []
    for index in range(task.num_items):
        item = fit_item(_builder(task, index), count_tokens, budget)
        item["length"] = count_tokens(item["input"] + item["answer_prefix"]) + task.tokens_to_generate
        items.append(item)
    return items


# ----------------------------------------------------------------------------- scoring


def postprocess(prediction: str) -> str:
    """RULER's: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's per-item score: the share of references found (case-insensitive) in the prediction."""
    prediction = postprocess(prediction).lower()
    return sum(r.lower() in prediction for r in references) / len(references)


@torch.no_grad()
def score_long_context(model, tokenizer, task: LongContextTask, stop_token_ids: Sequence[int] = (),
                       on_batch: Callable[[int], None] | None = None, details: list | None = None) -> dict:
    """Greedy answers one item at a time (rows of 8k+ tokens gain nothing from batching on a CPU) ->
    {"ruler_match", its stderr, "n", "by_depth"}."""
    from smoltrain.model.generate import generate

    scores, by_depth = [], {}
    for item in generate_items(task, tokenizer):
        prompt = encode(tokenizer, item["input"] + item["answer_prefix"])
        new_ids = generate(model, [prompt], max_new_tokens=task.tokens_to_generate, stop_tokens=stop_token_ids)[0]
        prediction = tokenizer.decode(new_ids, skip_special_tokens=True)
        score = string_match_all(prediction, item["outputs"])
        scores.append(score)
        if item["depth"] is not None:
            by_depth.setdefault(f"{10 * math.floor(item['depth'] / 10.0001):.0f}", []).append(score)
        if details is not None:
            details.append({"task": task.name, "length": item["length"], "depth": item["depth"],
                            "answer": item["outputs"], "predictions": [prediction], "score": score})
        if on_batch is not None:
            on_batch(1)
    return {"ruler_match": sum(scores) / len(scores), "ruler_match_stderr": standard_error(scores), "n": len(scores),
            "by_depth": {depth: sum(v) / len(v) for depth, v in sorted(by_depth.items(), key=lambda kv: float(kv[0]))}}


def long_context_grid(results: dict[str, dict]) -> tuple[list[str], list[int], list[list[float | None]]]:
    """(tasks, lengths, score[task][length] or None) of the `task@length` entries of eval results."""
    cells = {}
    for name, values in results.items():
        parsed = "@" in name and re.fullmatch(r"([a-z0-9_]+)@(\d+)", name)
        if parsed and parsed[1] in LONG_CONTEXT_TASKS and "ruler_match" in values:
            cells[(parsed[1], int(parsed[2]))] = values["ruler_match"]
    tasks = sorted({t for t, _ in cells}, key=LONG_CONTEXT_TASKS.index)
    lengths = sorted({n for _, n in cells})
    return tasks, lengths, [[cells.get((t, n)) for n in lengths] for t in tasks]


def long_context_markdown(results: dict[str, dict]) -> str:
    """The task x length accuracy grid as a markdown table ("" without long-context tasks)."""
    tasks, lengths, grid = long_context_grid(results)
    if not tasks:
        return ""
    lines = ["| task | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    lines += [f"| {t} | " + " | ".join("" if v is None else f"{100 * v:.0f}" for v in row) + " |" for t, row in zip(tasks, grid)]
    return "\n## Long context (RULER string match, %, by length in tokens)\n\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- loss by position


def position_buckets(seq_len: int, buckets: int) -> list[tuple[int, int]]:
    """Log-spaced [start, end) position ranges covering 0..seq_len (the long-context perplexity curve's x axis)."""
    edges = sorted({0, *(min(seq_len, round(seq_len ** (i / buckets))) for i in range(1, buckets + 1))})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@torch.no_grad()
def loss_by_position(model, batches: Sequence[dict], buckets: int, device=None) -> list[dict]:
    """[{"start", "end", "loss", "tokens"}]: mean validation loss of the tokens whose position inside their
    document (the position RoPE sees) falls in each bucket."""
    from smoltrain.model.attention import positions_from_documents
    from smoltrain.model.transformer import token_logprobs

    device = torch.device(device) if device is not None else next(model.parameters()).device
    seq_len = batches[0]["input_ids"].shape[1]
    nats = torch.zeros(seq_len, dtype=torch.float64)
    counts = torch.zeros(seq_len, dtype=torch.float64)
    for batch in batches:
        documents = batch.get("document_ids")
        labels = batch["labels"]
        logprobs = token_logprobs(model, batch["input_ids"].to(device), labels.to(device),
                                  document_ids=documents.to(device) if documents is not None else None).cpu()
        positions = (positions_from_documents(documents) if documents is not None and model.config.document_masking
                     else torch.arange(labels.shape[1]).expand_as(labels))
        valid = labels != -100
        nats.index_add_(0, positions[valid], -logprobs[valid].double())
        counts.index_add_(0, positions[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    curve = []
    for start, end in position_buckets(seq_len, buckets):
        tokens = counts[start:end].sum().item()
        if tokens:
            curve.append({"start": start, "end": end, "loss": nats[start:end].sum().item() / tokens, "tokens": int(tokens)})
    return curve


def loss_by_position_per_source(model, config, num_batches: int, batch_size: int, buckets: int, device=None) -> dict:
    """{source: loss_by_position curve} over the first `num_batches` validation batches of each source."""
    from smoltrain.data.loader import validation_batches
    from smoltrain.eval.validation import resolve_data_config

    config = resolve_data_config(config)
    if buckets <= 0 or num_batches <= 0 or not config.data.validation:
        return {}
    with evaluating(model):
        return {source: loss_by_position(model, list(validation_batches(config, source, num_batches, batch_size)), buckets, device)
                for source in config.data.validation}


def compare_extension(models: Iterable[tuple[str, object]], tokenizer, config, lengths: Sequence[int], needles: int,
                      needle_tokens: int, val_batches: int, buckets: int = 8) -> dict[str, dict]:
    """{name: {"needle": {length: RULER string match}, "needle_stderr", "loss_by_position": {source: curve}}} of
    each model (taken one at a time: a generator may load them lazily): single-needle accuracy (niah_single_1)
    at each of `lengths` and validation loss by position over rows of `config`'s data length. Models before
    and after a context extension, side by side."""
    results = {}
    for name, model in models:
        needle = {str(n): score_long_context(model, tokenizer, LongContextTask(
            f"niah_single_1@{n}", "niah_single_1", n, needles, answer_tokens=needle_tokens)) for n in lengths}
        results[name] = {"needle": {n: r["ruler_match"] for n, r in needle.items()},  # str keys: as JSON keeps them
                         "needle_stderr": {n: r["ruler_match_stderr"] for n, r in needle.items()},
                         "loss_by_position": loss_by_position_per_source(model, config, val_batches, 2, buckets)}
    return results


def extension_rows(results: dict[str, dict], trained: int) -> tuple[list[str], list[list[str]]]:
    """compare_extension's results as a table: needle accuracy per length (± standard error), and validation loss
    at positions inside and beyond the `trained` length (token-weighted over sources; a bucket across the boundary
    counts in neither)."""
    def loss(curves: dict, within: bool) -> str:
        buckets = [b for c in curves.values() for b in c if (b["end"] <= trained if within else b["start"] >= trained)]
        tokens = sum(b["tokens"] for b in buckets)
        return f"{sum(b['loss'] * b['tokens'] for b in buckets) / tokens:.3f}" if tokens else "-"

    lengths = list(next(iter(results.values()))["needle"])
    return (["model", *(f"needle @{int(n):,}" for n in lengths), f"loss @<{trained}", f"loss @>={trained}"],
            [[name, *(f"{100 * m['needle'][n]:.0f}% ± {100 * m['needle_stderr'][n]:.0f}" for n in lengths),
              loss(m["loss_by_position"], True), loss(m["loss_by_position"], False)] for name, m in results.items()])
