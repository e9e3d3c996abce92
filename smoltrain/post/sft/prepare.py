"""SFT data prepared once, on disk: conversations -> token and loss-target shards in parallel workers,
a packing plan from the lengths alone, cached by a hash of the inputs and settings for every rank and run.

One shard per input file in the pretraining format (data/shards.py: tokens as uint16/uint32, targets as
uint8, one .idx of conversation ends each), so the output does not depend on the number of workers and
batches are read with pread, never whole. Workers stream their file in batches of _BATCH conversations:
no list of all conversations or tokens exists anywhere. The folder is built under a temporary name and
renamed when complete, so an interrupted preparation leaves nothing that looks finished; under torchrun
the first rank of each node prepares and the others wait for that rename.
"""

from __future__ import annotations

import array
import gc
import hashlib
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from smoltrain.data.readers import expand_inputs, input_fingerprint
from smoltrain.data.shards import ShardWriter, TokenSource, file_sha256, shard_name, token_dtype, write_meta
from smoltrain.errors import DataError
from smoltrain.files import write_json
from smoltrain.post.sft.data import (
    ChatCounts,
    Example,
    PackingPlan,
    check_settings,
    data_report,
    fit_example,
    one_per_row,
    pack_best_fit,
    trained_shares,
)

FORMAT_VERSION = 1
PLAN, REPORT = "plan.npz", "report.json"
_BATCH = 512  # conversations rendered, then tokenized in one call: ~60k tokens keep Rust's threads busy
_WAIT_S = 0.5  # how often a waiting rank looks for the finished folder
_NAMED = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")  # "NAME=PATTERN": the files' source name, for weights and the report


@dataclass(frozen=True)
class Settings:
    """Everything besides the files and the tokenizer that decides the prepared data (all in the cache key)."""

    seq_len: int
    template: str  # the chat template's name; its text is hashed from the tokenizer folder
    loss: str = "assistant"
    overflow: str = "truncate"
    packing: bool = True
    instructions_as_system: bool = False
    skip_bad: bool = False
    weights: dict[str, float] = field(default_factory=dict)  # source -> conversations per epoch, as a multiple
    split: Optional[str] = None  # of dataset folders among the files


def named_files(entries: list[str]) -> list[tuple[str, Path]]:
    """(source name, file) of every file the entries match: "NAME=PATTERN" names all its files, a bare
    pattern names each file by its first dotted part (arithmetic.train.jsonl.gz -> arithmetic)."""
    from smoltrain.post.chat.data import source_of

    files = []
    for entry in entries:
        named = _NAMED.match(entry)
        if named and not Path(entry).exists():
            files += [(named.group(1), path) for path in expand_inputs([named.group(2)])]
        else:
            files += [(source_of(path), path) for path in expand_inputs([entry])]
    return files


def cache_key(files: list[tuple[str, Path]], tokenizer_dir: Path, settings: Settings) -> str:
    """A hash of the inputs (path, size, modification time, source name), the tokenizer and template
    files and the settings: a changed file or setting is another folder, the same ones the same."""
    spec = {"version": FORMAT_VERSION, "settings": asdict(settings),
            "files": [[name, *input_fingerprint(path)] for name, path in files],
            "tokenizer": {f.name: file_sha256(f) for f in sorted(tokenizer_dir.iterdir()) if f.is_file()}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- worker side

_worker: dict = {}  # this process's state as a preparation worker: the progress queue, the job, what its setup loaded


def _start_worker(progress_queue, threads: int, setup: Callable[..., dict], setup_args: tuple, job: Callable) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # each worker its share of the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    _worker.clear()
    _worker.update(queue=progress_queue, job=job, **setup(*setup_args))


def _run_job(task: dict) -> dict:
    return _worker["job"](task, _worker)


def report_progress(worker: dict, done: int) -> None:
    """Tell the driver's progress bar that `done` more rows are through."""
    if worker["queue"] is not None:
        worker["queue"].put(done)


def _given(state: dict) -> dict:
    return state


def _sft_worker(tokenizer_dir: str) -> dict:
    from smoltrain.post.chat.template import load_chat_tokenizer

    return {"tokenizer": load_chat_tokenizer(tokenizer_dir)}


def _batches(reader, size: int):
    batch = []
    for conv in reader:
        batch.append(conv)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(tokenizer, batch: list, settings: Settings, source: str, counts: ChatCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, targets, lengths) of the conversations of one batch that fit, concatenated; every
    conversation is counted (and its system prompt checked) in `counts`."""
    from smoltrain.post.chat.template import encode_chats

    for conv in batch:
        conv.source = source
        instructions = conv.kwargs.pop("custom_instructions", None) if settings.instructions_as_system else None
        if instructions and conv.messages[0]["role"] != "system":
            conv.messages.insert(0, {"role": "system", "content": instructions})
    kept_ids, kept_targets = [], []
    for conv, (ids, mask, text) in zip(batch, encode_chats(tokenizer, [(c.messages, c.kwargs) for c in batch])):
        ids, keep, outcome = fit_example(ids, mask, settings.seq_len, settings.loss, settings.overflow)
        counts.add(conv, text, outcome)
        if len(ids):
            kept_ids.append(ids)
            kept_targets.append(keep)
    if not kept_ids:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=bool), np.empty(0, dtype=np.int64)
    return np.concatenate(kept_ids), np.concatenate(kept_targets), np.array([len(ids) for ids in kept_ids])


def _prepare_file(task: dict, worker: dict) -> dict:
    """One input file -> one token shard, one target shard and its label counts; returns the file's
    entry (shard sizes, the report's counts, skipped rows)."""
    from smoltrain.post.chat.data import ConversationReader

    s, folder, name = Settings(**task["settings"]), Path(task["folder"]), task["shard"]
    reader = ConversationReader(task["path"], s.skip_bad, s.split)
    counts, labels = ChatCounts(), array.array("i")  # 4 bytes a conversation
    with ShardWriter(folder / "tokens", name, np.dtype(task["dtype"])) as tokens, \
            ShardWriter(folder / "targets", name, np.uint8) as targets:
        for batch in _batches(reader, _BATCH):
            ids, keep, lengths = _encode_batch(worker["tokenizer"], batch, s, task["source"], counts)
            if len(lengths):  # one write per batch: ids fit the dtype, which token_dtype chose for the vocabulary
                tokens.add_documents(ids, lengths)
                targets.add_documents(keep.view(np.uint8), lengths)
                labels.extend(np.add.reduceat(keep, np.cumsum(lengths) - lengths, dtype=np.int64).tolist())
            report_progress(worker, len(batch))
        shard = tokens.close() if labels else None
        if shard is not None:
            targets.close()
        else:  # every conversation of the file was dropped: counted in the report, no shard
            tokens.abort()
            targets.abort()
    np.save(folder / f"{name}.labels.npy", np.frombuffer(labels, dtype=np.int32))
    return {"name": name, "source": task["source"], "file": task["path"], "num_tokens": shard["num_tokens"] if shard else 0,
            "num_documents": len(labels), "counts": counts.to_dict(), "skipped": dict(reader.skipped)}


# ----------------------------------------------------------------------------- driver


def run_file_tasks(tasks: list[dict], job: Callable[[dict, dict], dict], setup: Callable[..., dict], setup_args: tuple,
                   workers: int | None, show_progress: bool, what: str) -> list[dict]:
    """`job(task, worker)` of every task (one input file each, `task["path"]`) over worker processes,
    largest file first, each worker set up once by `setup(*setup_args)`; the results in task order.
    A worker's error (a DataError at file:line) is raised here."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cores, len(tasks)))
    threads = max(1, cores // workers)
    order = sorted(range(len(tasks)), key=lambda i: -Path(tasks[i]["path"]).stat().st_size)  # the last to finish is a short one
    results: dict[int, dict] = {}
    columns = [TextColumn(f"prepare {what}"), BarColumn(), MofNCompleteColumn(), TextColumn("files, {task.fields[rate]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        bar = progress.add_task("prepare", total=len(tasks), rate="")
        started, rows = time.perf_counter(), 0

        def advance(done: int) -> None:
            nonlocal rows
            rows += done
            progress.update(bar, rate=f"{rows} rows ({rows / max(1e-3, time.perf_counter() - started):.0f}/s)")

        if workers == 1:  # in-process: Rust threads parallelise each batch across the cores
            local: queue.SimpleQueue = queue.SimpleQueue()
            _start_worker(local, threads, setup, setup_args, job)
            for i in order:
                results[i] = _run_job(tasks[i])
                while not local.empty():
                    advance(local.get())
                progress.advance(bar)
            return [results[i] for i in range(len(tasks))]
        # A forked child must not start Rust threads if the parent used them (tokenizers deadlocks), so
        # workers with several threads start from a fresh fork server (data/tokenize_shards.py's rule).
        methods = mp.get_all_start_methods()
        method = "fork" if threads == 1 and "fork" in methods else "forkserver" if "forkserver" in methods else "spawn"
        if method == "fork":  # set up once here and inherited: each worker importing transformers and loading the
            setup, setup_args = _given, (setup(*setup_args),)  # tokenizer cost ~1.2 CPU-s (5k conversations: 6.2 -> 4.9 in all)
        ctx = mp.get_context(method)
        progress_queue = ctx.Queue()
        gc.freeze()  # the children's collections then leave the inherited objects' pages unwritten (unshared):
        try:  # 5k conversations over 2 forked workers, 4.4 -> 3.6 CPU-s in all
            with ctx.Pool(workers, initializer=_start_worker, initargs=(progress_queue, threads, setup, setup_args, job)) as pool:
                pending = {i: pool.apply_async(_run_job, (tasks[i],)) for i in order}
                while pending:
                    try:
                        while True:
                            advance(progress_queue.get(timeout=0.1))
                    except queue.Empty:
                        pass
                    for i in [i for i, result in pending.items() if result.ready()]:
                        results[i] = pending.pop(i).get()  # re-raises a worker's DataError here
                        progress.advance(bar)
        finally:
            gc.unfreeze()
    return [results[i] for i in range(len(tasks))]


def mixture_items(example_source: np.ndarray, sources: list[str], weights: dict[str, float]) -> np.ndarray:
    """Example indices of one epoch: a source of weight w gives floor(w) copies of every conversation
    plus a seeded draw of the fraction left (0.5: half of them, 2: each twice). Weight 1 everywhere is
    every example once, in order: the plan of an unweighted mixture is the old one."""
    parts = []
    for k, name in enumerate(sources):
        mine = np.flatnonzero(example_source == k)
        weight = weights.get(name, 1.0)
        whole, extra = int(weight), round((weight - int(weight)) * len(mine))
        parts += [mine] * whole
        if extra:
            rng = np.random.default_rng(int(hashlib.sha256(f"sft-mixture/{name}".encode()).hexdigest()[:15], 16))
            parts.append(np.sort(rng.choice(mine, size=extra, replace=False)))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _write_plan(folder: Path, entries: list[dict], settings: Settings, vocab_size: int, tokenizer_hash: str,
                started: float) -> dict:
    """meta.json of both shard folders, the packing plan over the weighted examples, the data report."""
    shards = [{k: e[k] for k in ("name", "num_tokens", "num_documents")} for e in entries if e["num_documents"]]
    if not shards:
        raise DataError("sft.data: every conversation was dropped (see sft.overflow and the data check)")
    write_meta(folder / "tokens", shards=shards, dtype=token_dtype(vocab_size), vocab_size=vocab_size,
               tokenizer_hash=tokenizer_hash)
    write_meta(folder / "targets", shards=shards, dtype=np.uint8, vocab_size=2, tokenizer_hash=None)
    lengths = np.concatenate([np.diff(np.fromfile(folder / "tokens" / f"{s['name']}.idx", dtype=np.int64), prepend=0)
                              for s in shards])
    labels = np.concatenate([np.load(folder / f"{e['name']}.labels.npy") for e in entries])
    sources = list(dict.fromkeys(e["source"] for e in entries))
    example_source = np.repeat([sources.index(e["source"]) for e in entries],
                               [e["num_documents"] for e in entries]).astype(np.int32)
    items = mixture_items(example_source, sources, settings.weights)
    plan = pack_best_fit(lengths[items], settings.seq_len) if settings.packing else one_per_row(items)
    plan = PackingPlan(items[plan.items], plan.offsets)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    np.savez(folder / PLAN, starts=starts, lengths=lengths.astype(np.int32), items=plan.items, offsets=plan.offsets,
             example_source=example_source, sources=np.array(sources))
    counts, skipped = ChatCounts(), {}
    for e in entries:
        counts.merge(e["counts"])
        for kind, n in e["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    trained = trained_shares(sources, example_source, lengths, labels, plan.items)
    for name, shares in trained.items():
        shares["weight"] = settings.weights.get(name, 1.0)
    report = data_report(counts, trained, len(plan), settings.seq_len, skipped, settings.template)
    report["files"] = [e["file"] for e in entries]
    report["preparation_s"] = round(time.perf_counter() - started, 2)
    write_json(folder / REPORT, report)
    return report


def build_once(final: Path, build: Callable[[Path], None], done: str) -> Path:
    """`final`, built by `build(tmp)` under a temporary name and renamed into place unless `final/done`
    exists already. Under torchrun the first rank of each node builds and the others wait for the
    rename (torchrun ends them if it fails); two nodes sharing a file system may both build, and the
    second rename finds the first's identical folder."""
    if (final / done).is_file():
        return final
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        while not (final / done).is_file():
            time.sleep(_WAIT_S)
        return final
    tmp = final.parent / f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / done).is_file():  # not another node's identical copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare(files: list[tuple[str, Path]], tokenizer_dir: Path, settings: Settings, cache_dir: str | os.PathLike,
            workers: int | None = None, show_progress: bool = True) -> Path:
    """The prepared folder of these files and settings: found in the cache, else built (by the first
    rank of this node; the other ranks wait for it)."""
    check_settings(settings.loss, settings.overflow)
    unknown = set(settings.weights) - {name for name, _ in files}
    if unknown:
        known = ", ".join(sorted({name for name, _ in files}))
        raise DataError(f"sft.mixture names {', '.join(sorted(unknown))}, which no sft.data file is (sources: {known})")
    tokenizer_dir = Path(tokenizer_dir)

    def build(tmp: Path) -> None:
        from smoltrain.data.tokenizer import load_tokenizer, tokenizer_file_hash

        for sub in ("tokens", "targets"):
            (tmp / sub).mkdir()
        tokenizer_json = tokenizer_dir / "tokenizer.json"
        vocab_size = load_tokenizer(tokenizer_json).get_vocab_size()
        tasks = [{"path": str(path), "source": name, "shard": shard_name("sft", i), "folder": str(tmp),
                  "dtype": token_dtype(vocab_size).name, "settings": asdict(settings)} for i, (name, path) in enumerate(files)]
        started = time.perf_counter()
        entries = run_file_tasks(tasks, _prepare_file, _sft_worker, (str(tokenizer_dir),), workers, show_progress, "sft data")
        _write_plan(tmp, entries, settings, vocab_size, tokenizer_file_hash(tokenizer_json), started)

    final = Path(cache_dir).expanduser() / "sft" / cache_key(files, tokenizer_dir, settings)
    return build_once(final, build, PLAN)


# ----------------------------------------------------------------------------- reading


class ShardExamples:
    """Example i of a prepared folder, its ids and targets read with pread (memory: 16 bytes an example
    for the starts and lengths, never the tokens)."""

    def __init__(self, folder: Path, plan: dict):
        self.starts, self.lengths = plan["starts"], plan["lengths"]
        self.sources, self.example_source = plan["sources"], plan["example_source"]
        self.tokens, self.targets = TokenSource(folder / "tokens"), TokenSource(folder / "targets")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Example:
        start, n = int(self.starts[i]), int(self.lengths[i])
        ids, targets = np.empty(n, dtype=np.int64), np.empty(n, dtype=bool)
        self.tokens.read(start, ids)
        self.targets.read(start, targets)
        return Example(ids, targets, str(self.sources[self.example_source[i]]), int(i))

    def close(self) -> None:
        self.tokens.close()
        self.targets.close()


def load_prepared(folder: Path) -> tuple[ShardExamples, PackingPlan, dict]:
    """(examples, plan, data report) of a prepared folder."""
    with np.load(folder / PLAN) as stored:
        plan = {k: stored[k] for k in stored.files}
    report = json.loads((folder / REPORT).read_text())
    return ShardExamples(folder, plan), PackingPlan(plan["items"], plan["offsets"]), report


__all__ = ["Settings", "ShardExamples", "build_once", "cache_key", "load_prepared", "mixture_items", "named_files", "prepare",
           "report_progress", "run_file_tasks"]
