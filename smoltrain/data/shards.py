"""Token shards on disk: `<name>_<5 digits>.bin` (tokens) + `.idx` (document end offsets) + one meta.json.

Shards are memory-mapped, never read whole. The process's view of the pages is dropped from time to
time (`release`), so resident memory stays flat however many tokens the run walks through: the
bytes stay in the OS page cache, which is shared and not counted against us.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoltrain.errors import DataError

FORMAT = "smoltrain-shards/1"
META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page cache for every vocabulary up to 65,536 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(name: str, index: int) -> str:
    return f"{name}_{index:05d}"


def file_sha256(path: str | os.PathLike, prefix: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:prefix]


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one shard document by document under temp names; `close` renames both files into place.

    Used as a context manager: an exception inside the block removes the temp files, so a failed
    run never leaves a half-written shard.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, dtype: np.dtype):
        self.out_dir = Path(out_dir)
        self.name = name
        self.dtype = np.dtype(dtype)
        self.num_tokens = 0
        self.num_documents = 0
        suffix = f".{os.getpid()}.tmp"
        self._tmp_bin = self.out_dir / f".{name}.bin{suffix}"
        self._tmp_idx = self.out_dir / f".{name}.idx{suffix}"
        self._bin = open(self._tmp_bin, "wb", buffering=1 << 20)
        self._idx = open(self._tmp_idx, "wb", buffering=1 << 16)
        self._max = np.iinfo(self.dtype).max

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() > self._max:
            raise ValueError(f"token ids outside {self.dtype} range")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += int(tokens.size)
        self.num_documents += 1
        self._idx.write(np.int64(self.num_tokens).tobytes())

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many documents at once: `tokens` concatenated, `lengths` per document (all > 0)."""
        if len(lengths) == 0:
            return
        self._bin.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        ends = self.num_tokens + np.cumsum(lengths, dtype=np.int64)
        self._idx.write(ends.tobytes())
        self.num_tokens = int(ends[-1])
        self.num_documents += len(lengths)

    def close(self) -> dict:
        self._bin.close()
        self._idx.close()
        if self.num_documents == 0:
            self.abort()
            raise DataError(f"{self.out_dir / self.name}: no documents to write")
        os.replace(self._tmp_bin, self.out_dir / f"{self.name}.bin")
        os.replace(self._tmp_idx, self.out_dir / f"{self.name}.idx")
        return {"name": self.name, "num_tokens": self.num_tokens, "num_documents": self.num_documents}

    def abort(self) -> None:
        for f in (self._bin, self._idx):
            if not f.closed:
                f.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def write_meta(out_dir: str | os.PathLike, *, shards: list[dict], dtype: np.dtype, vocab_size: int,
               tokenizer_hash: str | None, **extra) -> dict:
    """meta.json makes a folder a dataset: the loader reads nothing that it does not list."""
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(vocab_size),
        "tokenizer_hash": tokenizer_hash,
        "num_tokens": int(sum(s["num_tokens"] for s in shards)),
        "num_documents": int(sum(s["num_documents"] for s in shards)),
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    write_json_atomic(Path(out_dir) / META, meta)
    return meta


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: no such data folder")
    if not path.is_file():
        raise DataError(f"{path}: missing (not a finished shard folder; run `smoltrain data tokenize`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for key in ("format", "dtype", "shards", "vocab_size"):
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}'")
    if meta["format"] != FORMAT:
        raise DataError(f"{path}: format {meta['format']!r} is not {FORMAT!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} (expected uint16 or uint32)")
    return meta


# ----------------------------------------------------------------------------- reading


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@dataclass
class _Shard:
    start: int  # global offset of the shard's first token in the folder's token stream
    tokens: np.ndarray  # views of the maps below
    ends: np.ndarray  # document end offsets, local to the shard (the last one == len(tokens))
    maps: tuple


class TokenSource:
    """One shard folder seen as a single token stream with document boundaries.

    Memory is O(number of shards), never O(tokens or documents): `read` and `document_ends`
    go through the maps.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokenizer_hash = self.meta.get("tokenizer_hash")
        self._shards: list[_Shard] = []
        self._starts: list[int] = []
        self._touched: set[int] = set()
        start = 0
        for entry in self.meta["shards"]:
            self._shards.append(self._open(entry, start))
            self._starts.append(start)
            start += len(self._shards[-1].tokens)
        self.num_tokens = start
        if self.num_tokens == 0:
            raise DataError(f"{self.folder / META}: lists no tokens")

    def _open(self, entry: dict, start: int) -> _Shard:
        name = entry["name"]
        bin_path, idx_path = self.folder / f"{name}.bin", self.folder / f"{name}.idx"
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"{p}: missing (listed in {self.folder / META})")
        expected = int(entry["num_tokens"])
        if bin_path.stat().st_size != expected * self.dtype.itemsize:
            raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, meta.json says {expected} {self.dtype.name} tokens")
        if idx_path.stat().st_size != 8 * int(entry["num_documents"]) or entry["num_documents"] == 0:
            raise DataError(f"{idx_path}: size does not match {entry['num_documents']} documents in meta.json")
        bin_map, idx_map = _map(bin_path), _map(idx_path)
        tokens = np.frombuffer(bin_map, dtype=self.dtype)
        ends = np.frombuffer(idx_map, dtype=np.int64)
        if int(ends[-1]) != expected:
            raise DataError(f"{idx_path}: last document ends at {int(ends[-1])}, the shard has {expected} tokens")
        return _Shard(start, tokens, ends, (bin_map, idx_map))

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the stream into `out` (any integer dtype)."""
        stop = start + len(out)
        k = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            shard = self._shards[k]
            lo = pos - shard.start
            hi = min(stop - shard.start, len(shard.tokens))
            out[pos - start : pos - start + hi - lo] = shard.tokens[lo:hi]
            self._touched.add(k)
            pos += hi - lo
            k += 1

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Offsets p in (start, stop), relative to start, where a new document begins at start + p."""
        found = []
        k = bisect.bisect_right(self._starts, start) - 1
        while k < len(self._shards) and self._shards[k].start < stop:
            shard = self._shards[k]
            lo = np.searchsorted(shard.ends, start - shard.start, side="right")
            hi = np.searchsorted(shard.ends, stop - shard.start, side="left")
            self._touched.add(k)
            if hi > lo:
                found.append(shard.ends[lo:hi] + (shard.start - start))
            k += 1
        if not found:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(found)

    def release(self) -> None:
        """Drop our mapping of the pages touched since the last call (they stay in the page cache)."""
        for k in self._touched:
            for m in self._shards[k].maps:
                m.madvise(mmap.MADV_DONTNEED)
        self._touched.clear()

    def close(self) -> None:
        shards, self._shards = self._shards, []
        for shard in shards:
            shard.tokens = shard.ends = None
            for m in shard.maps:
                try:
                    m.close()
                except BufferError:  # a caller still holds a view; the map goes with it
                    pass
