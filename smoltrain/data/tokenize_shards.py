"""`smoltrain data tokenize`: input files -> token shards, one shard per input file, in parallel.

One shard per file makes the output independent of the number of workers and makes re-runs cheap:
a shard whose input file, tokenizer and settings are unchanged is kept. Workers stream documents in
batches (bounded memory) into a hidden staging folder; only when every file is done do the new
shards move into place and meta.json is written, so an aborted job leaves nothing that looks like
data (its finished shards wait in the staging folder for the re-run). Documents longer than
MAX_PIECE_CHARS are encoded in pieces cut before a space: the BPE encoder needs ~130 bytes per
character at once (a 29 MB record took 3.8 GB), pieces bound that to ~35 MB.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from smoltrain.data.readers import DocumentReader, expand_inputs, input_size
from smoltrain.data.shards import META, ShardWriter, shard_name, token_dtype, write_meta
from smoltrain.errors import DataError
from smoltrain.files import write_json

_BATCH_CHARS = 1 << 20  # characters per encode_batch call: large enough to keep Rust busy, small for memory
MAX_PIECE_CHARS = 1 << 18  # longer documents are encoded in pieces of at most this many characters
STAGING = ".partial"  # finished shards of an unfinished job


def split_long(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, each cut just before a space that starts a word
    (" word": a pre-tokenizer boundary of byte-level BPE, so the ids equal those of the whole text),
    else before a newline, else anywhere (a run of `limit` characters without either)."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = -1
        for position in range(end - 1, start + limit // 2, -1):  # the last word start in the second half
            if text[position] == " " and not text[position - 1].isspace() and not text[position + 1].isspace():
                cut = position
                break
        if cut < 0:
            cut = text.rfind("\n", start + 1, end)
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _done_marker(out: Path, shard: str) -> Path:
    return out / f".{shard}.done.json"


def _fingerprint(path: Path, settings: dict) -> dict:
    st = path.stat()
    return {"input": str(path.resolve()), "size": input_size(path), "mtime_ns": st.st_mtime_ns, **settings}


# ----------------------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(progress_queue, tokenizer_path: str, threads: int) -> None:
    # Rayon sizes its pool on first use: give each worker its share of the cores.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"  # "false" also silences the fork warning
    from smoltrain.data.tokenizer import load_tokenizer

    _worker.update(queue=progress_queue, tokenizer=load_tokenizer(tokenizer_path))


def _tokenize_file(task: dict) -> dict:
    """Tokenize one input file into one shard; returns the shard entry for meta.json."""
    tok, report = _worker["tokenizer"], _worker["queue"]
    out, path = Path(task["out"]), Path(task["path"])
    eot, dtype = task["eot_id"], np.dtype(task["dtype"])
    head = np.array([task["bos_id"]] if task["bos_id"] is not None else [], dtype=dtype)
    tail = np.array([eot], dtype=dtype)
    reader = DocumentReader(path, task["text_key"], task["skip_bad"], task["split"])
    num_bytes, reported = 0, 0
    staging = out / STAGING
    with ShardWriter(staging, task["shard"], dtype) as writer:

        def flush(texts: list[str]) -> None:
            nonlocal num_bytes, reported
            if not texts:
                return
            pieces, owner = [], []
            for i, text in enumerate(texts):
                for piece in (split_long(text, MAX_PIECE_CHARS) if len(text) > MAX_PIECE_CHARS else [text]):
                    pieces.append(piece)
                    owner.append(i)
            # Encodings (ids, offsets, token strings) are large: at most _BATCH_CHARS characters of them
            # are alive at once, each turned into a compact array before the next call.
            ids_of: list[list[np.ndarray]] = [[head] for _ in texts]
            start = 0
            while start < len(pieces):
                end, chars = start, 0
                while end < len(pieces) and (end == start or chars + len(pieces[end]) <= _BATCH_CHARS):
                    chars += len(pieces[end])
                    end += 1
                for i, enc in zip(owner[start:end], tok.encode_batch_fast(pieces[start:end], add_special_tokens=False)):
                    ids_of[i].append(np.asarray(enc.ids, dtype=dtype))
                start = end
            documents = [np.concatenate(arrays + [tail]) for arrays in ids_of]
            lengths = np.array([len(d) for d in documents], dtype=np.int64)
            flat = np.concatenate(documents)
            writer.add_documents(flat, lengths)
            num_bytes += sum(len(t.encode("utf-8")) for t in texts)
            if report is not None:
                report.put((reader.bytes_read - reported, len(flat)))
                reported = reader.bytes_read

        batch, chars = [], 0
        for text in reader:
            batch.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        flush(batch)
        if reader.documents:
            entry = writer.close()
        else:  # an empty file under skip_bad: counted, no shard
            writer.abort()
            entry = {"name": task["shard"], "num_tokens": 0, "num_documents": 0, "empty": True}
    if report is not None:
        report.put((reader.size - reported, 0))
    entry.update(num_bytes=num_bytes, skipped=dict(reader.skipped), **task["fingerprint"])
    write_json(_done_marker(staging, task["shard"]), entry)
    return entry


# ----------------------------------------------------------------------------- driver


def _finished(out: Path, shard: str, fingerprint: dict, previous: dict) -> dict | None:
    """The shard's entry if it exists (staged by an unfinished job, or listed by the last complete
    one) and was made from the same input with the same settings."""
    for folder, entry in ((out / STAGING, _read_marker(out / STAGING, shard)), (out, previous.get(shard))):
        if not entry or any(entry.get(k) != v for k, v in fingerprint.items()):
            continue
        if entry.get("empty") or ((folder / f"{shard}.bin").is_file() and (folder / f"{shard}.idx").is_file()):
            return entry
    return None


def _read_marker(folder: Path, shard: str) -> dict | None:
    try:
        return json.loads(_done_marker(folder, shard).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cleanup(out: Path, shards: list[str]) -> None:
    for shard in shards:
        for tmp in (out / STAGING).glob(f".{shard}.*.tmp"):
            tmp.unlink(missing_ok=True)


def tokenize(tokenizer: str, inputs: list[str], out_dir: str | os.PathLike, text_key: str = "text",
             workers: int | None = None, skip_bad: bool = False, add_bos: bool = False, name: str | None = None,
             show_progress: bool = True, split: str | None = None) -> dict:
    """Tokenize jsonl / jsonl.gz / parquet / text files and dataset folders (their `split`) into the shard
    contract; returns meta.json's content."""
    from smoltrain.data.tokenizer import load_tokenizer, special_token_id, tokenizer_file_hash

    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    eot_id = special_token_id(tok, "eos")
    bos_id = special_token_id(tok, "bos") if add_bos else None
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    out = Path(out_dir)
    (out / STAGING).mkdir(parents=True, exist_ok=True)
    name = name or out.name
    tok_hash = tokenizer_file_hash(tokenizer)
    settings = {"tokenizer_hash": tok_hash, "text_key": text_key, "add_bos": add_bos, "skip_bad": skip_bad,
                "dtype": dtype.name, "split": split}
    shards = [shard_name(name, i) for i in range(len(files))]
    task_settings = {"out": str(out), "text_key": text_key, "skip_bad": skip_bad, "eot_id": eot_id, "bos_id": bos_id,
                     "dtype": dtype.name, "split": split}
    tasks, entries = _tasks(out, files, shards, settings, task_settings)
    _cleanup(out, shards)

    started = time.perf_counter()
    entries.update(_tokenize_tasks(out, shards, tasks, tokenizer, workers, show_progress))
    elapsed = time.perf_counter() - started

    ordered, skipped = _publish(out, name, shards, entries)
    if not ordered:
        raise DataError(f"{', '.join(inputs)}: no documents in any input file ({sum(skipped.values())} bad records skipped)")
    meta = write_meta(
        out, shards=ordered, dtype=dtype, vocab_size=vocab_size, tokenizer_hash=tok_hash,
        tokenizer=str(tokenizer), eot_token_id=eot_id, bos_token_id=bos_id, text_key=text_key,
        num_bytes=int(sum(e["num_bytes"] for e in ordered)), source_files=[str(f) for f in files],
        skipped_records=dict(skipped),
    )
    shutil.rmtree(out / STAGING, ignore_errors=True)
    meta["elapsed_s"] = elapsed
    meta["tokenized_files"] = len(tasks)
    return meta


def _tasks(out: Path, files: list[Path], shards: list[str], settings: dict, task_settings: dict) -> tuple[list[dict], dict]:
    """The files still to tokenize (as worker tasks), and the entries of the shards that are already done."""
    # A previous complete run lists its shards in meta.json; they stay a complete dataset until this
    # job has staged every new shard.
    previous: dict = {}
    meta_path = out / META
    if meta_path.is_file():
        try:
            previous = {s["name"]: s for s in json.loads(meta_path.read_text()).get("shards", [])}
        except (json.JSONDecodeError, TypeError, KeyError):
            previous = {}
    tasks, entries = [], {}
    for path, shard in zip(files, shards):
        fingerprint = _fingerprint(path, settings)
        done = _finished(out, shard, fingerprint, previous)
        if done is not None:
            entries[shard] = done
            continue
        tasks.append({**task_settings, "path": str(path), "shard": shard, "fingerprint": fingerprint})
    return tasks, entries


def _tokenize_tasks(out: Path, shards: list[str], tasks: list[dict], tokenizer: str, workers: int | None,
                    show_progress: bool) -> dict:
    """Run the tasks over the cores (largest file first); their shards wait in the staging folder."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cores, len(tasks) or 1))
    total_bytes = sum(input_size(Path(t["path"])) for t in tasks)
    entries = {}
    try:
        tasks.sort(key=lambda t: -Path(t["path"]).stat().st_size)  # largest first: the last to finish is short
        for entry in _run(tasks, tokenizer, workers, max(1, cores // workers), total_bytes, show_progress):
            entries[entry["name"]] = entry
    except BaseException:
        _cleanup(out, shards)
        raise
    return entries


def _publish(out: Path, name: str, shards: list[str], entries: dict) -> tuple[list[dict], Counter]:
    """Every shard is ready: take the old meta.json down, move the staged shards in, drop shards of
    inputs no longer given (or now empty). Returns the non-empty shards' entries in order and the
    skipped records per reason; the caller writes the new meta.json."""
    (out / META).unlink(missing_ok=True)
    for shard in shards:
        for suffix in (".bin", ".idx"):
            staged = out / STAGING / f"{shard}{suffix}"
            if staged.is_file():
                os.replace(staged, out / f"{shard}{suffix}")
    keep = {s for s in shards if not entries[s].get("empty")}
    for stale in out.glob(f"{name}_[0-9][0-9][0-9][0-9][0-9].*"):
        if stale.stem not in keep:
            stale.unlink()
    skipped = Counter()
    for shard in shards:
        skipped.update(entries[shard].get("skipped", {}))
    return [entries[s] for s in shards if s in keep], skipped


def progress_rates(num_bytes: int, num_tokens: int, elapsed_s: float) -> str:
    """Average input bytes and tokens per second since the job started, e.g. "1.70 MB/s 0.42M tok/s"."""
    elapsed_s = max(elapsed_s, 1e-3)
    return f"{num_bytes / elapsed_s / 1e6:.2f} MB/s {num_tokens / elapsed_s / 1e6:.2f}M tok/s"


def _run(tasks: list[dict], tokenizer: str, workers: int, threads: int, total_bytes: int, show_progress: bool):
    """Yield shard entries as tasks finish, with a progress bar fed by the workers."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    if not tasks:
        return
    # Rates are averages since the start: rich's TransferSpeedColumn divides by the time between the
    # last two updates, and a small file reported in two bursts microseconds apart read 36.5 GB/s.
    columns = [TextColumn("tokenize"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        bar = progress.add_task("tokenize", total=total_bytes, rate="")
        started, done_bytes, tokens = time.perf_counter(), 0, 0

        def advance(num_bytes: int, num_tokens: int) -> None:
            nonlocal done_bytes, tokens
            done_bytes += num_bytes
            tokens += num_tokens
            progress.update(bar, advance=num_bytes, rate=progress_rates(done_bytes, tokens, time.perf_counter() - started))

        if workers == 1:  # in-process: Rust threads parallelise encode_batch across the cores
            local: queue.SimpleQueue = queue.SimpleQueue()
            _init_worker(local, tokenizer, threads)
            for task in tasks:
                entry = _tokenize_file(task)
                while not local.empty():
                    advance(*local.get())
                yield entry
            return

        # A forked child must not start Rust threads if the parent used them (tokenizers deadlocks), so
        # workers that get several threads start from a fresh fork server instead.
        methods = mp.get_all_start_methods()
        if threads == 1 and "fork" in methods:
            ctx = mp.get_context("fork")
        else:
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        progress_queue = ctx.Queue()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(progress_queue, tokenizer, threads)) as pool:
            pending = [pool.apply_async(_tokenize_file, (task,)) for task in tasks]
            while pending:
                try:
                    while True:
                        advance(*progress_queue.get(timeout=0.1))
                except queue.Empty:
                    pass
                for result in [r for r in pending if r.ready()]:
                    pending.remove(result)
                    yield result.get()  # re-raises a worker's DataError here; the pool is then terminated
            while True:
                try:
                    advance(*progress_queue.get_nowait())
                except queue.Empty:
                    break
