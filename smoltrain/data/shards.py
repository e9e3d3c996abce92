"""Token shards on disk: `<name>_<5 digits>.bin` (tokens) + `.idx` (document end offsets) + one meta.json.

Shards are read with pread, never whole and never memory-mapped: on current kernels (6.x, ext4 large
folios) one fault on a mapped shard maps up to 2 MB, so random windows would grow resident memory by
~1.4 MB each (measured, docs/LOG.md). pread copies only the window; the OS page cache, shared and not
counted against the process, does the caching. Document ends are found by binary search on the .idx file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoltrain.errors import DataError
from smoltrain.files import write_json

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
    write_json(Path(out_dir) / META, meta)
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
    if meta["dtype"] not in ("uint8", "uint16", "uint32"):  # uint8: SFT's loss targets (post/sft/prepare.py)
        raise DataError(f"{path}: dtype {meta['dtype']!r} (expected uint8, uint16 or uint32)")
    return meta


# ----------------------------------------------------------------------------- reading

_HAS_FADVISE = hasattr(os, "posix_fadvise")  # Linux; elsewhere reads simply wait for the disk
_OPEN_FILES = 64  # descriptors kept open per source; thousand-shard datasets stay under the fd limit
_BLOCK = 2048  # .idx entries (16 KB) read at once: the guessed neighbourhood, or the end of a binary search


@dataclass
class _Shard:
    start: int  # global offset of the shard's first token in the folder's token stream
    num_tokens: int
    num_documents: int
    bin_path: Path
    idx_path: Path


class TokenSource:
    """One shard folder seen as a single token stream with document boundaries.

    Memory is O(number of shards), never O(tokens or documents).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokenizer_hash = self.meta.get("tokenizer_hash")
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._scratch = np.empty(0, dtype=self.dtype)
        self._shards: list[_Shard] = []
        self._starts: list[int] = []
        start = 0
        for entry in self.meta["shards"]:
            shard = self._check(entry, start)
            self._shards.append(shard)
            self._starts.append(start)
            start += shard.num_tokens
        self.num_tokens = start
        if self.num_tokens == 0:
            raise DataError(f"{self.folder / META}: lists no tokens")

    def fingerprint(self) -> str:
        """What a loader position in this source refers to: shard names, token and document counts
        (which fix the file sizes), dtype and tokenizer hash. Another folder with the same shards
        has the same fingerprint; re-tokenized or re-sampled data has another."""
        spec = {"tokenizer_hash": self.tokenizer_hash, "dtype": self.dtype.name,
                "shards": [[e["name"], int(e["num_tokens"]), int(e["num_documents"])] for e in self.meta["shards"]]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _check(self, entry: dict, start: int) -> _Shard:
        name = entry["name"]
        bin_path, idx_path = self.folder / f"{name}.bin", self.folder / f"{name}.idx"
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"{p}: missing (listed in {self.folder / META})")
        tokens, documents = int(entry["num_tokens"]), int(entry["num_documents"])
        if bin_path.stat().st_size != tokens * self.dtype.itemsize:
            raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, meta.json says {tokens} {self.dtype.name} tokens")
        if documents == 0 or idx_path.stat().st_size != 8 * documents:
            raise DataError(f"{idx_path}: size does not match {documents} documents in meta.json")
        shard = _Shard(start, tokens, documents, bin_path, idx_path)
        last = self._ends(shard, documents - 1, 1)[0]
        if last != tokens:
            raise DataError(f"{idx_path}: last document ends at {last}, the shard has {tokens} tokens")
        return shard

    def _fd(self, path: Path) -> int:
        fd = self._files.get(path)
        if fd is None:
            if len(self._files) >= _OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        else:
            self._files.move_to_end(path)
        return fd

    def _ends(self, shard: _Shard, first: int, count: int) -> np.ndarray:
        data = os.pread(self._fd(shard.idx_path), 8 * count, 8 * first)
        return np.frombuffer(data, dtype=np.int64)

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the stream into `out` (any integer dtype)."""
        stop = start + len(out)
        if len(self._scratch) < len(out):
            self._scratch = np.empty(len(out), dtype=self.dtype)
        k = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            shard = self._shards[k]
            lo, hi = pos - shard.start, min(stop - shard.start, shard.num_tokens)
            buf = self._scratch[: hi - lo]
            got = os.preadv(self._fd(shard.bin_path), [buf], lo * self.dtype.itemsize)
            if got != buf.nbytes:
                raise DataError(f"{shard.bin_path}: short read at token {lo} (file changed while training?)")
            out[pos - start : pos - start + hi - lo] = buf
            pos += hi - lo
            k += 1

    def prefetch(self, start: int, length: int) -> None:
        """Ask the OS to start reading tokens [start, start + length) into the page cache; returns at once."""
        if not _HAS_FADVISE:
            return
        stop = start + length
        k = bisect.bisect_right(self._starts, start) - 1
        while k < len(self._shards) and self._shards[k].start < stop:
            shard = self._shards[k]
            lo, hi = max(0, start - shard.start), min(stop - shard.start, shard.num_tokens)
            size = self.dtype.itemsize
            os.posix_fadvise(self._fd(shard.bin_path), lo * size, (hi - lo) * size, os.POSIX_FADV_WILLNEED)
            k += 1

    def _ends_from(self, shard: _Shard, x: int) -> tuple[int, np.ndarray]:
        """(i, ends[i:i+m]) with i the first document ending after local offset x (m >= 0 entries).

        Document lengths are roughly even within a shard, so the position is first guessed by
        interpolation and one block around the guess usually holds it (one pread per window);
        otherwise a binary search with one 8-byte pread per step narrows it down.
        """
        lo, hi = 0, shard.num_documents  # invariant: the answer lies in [lo, hi]
        if hi > _BLOCK:
            first = min(max(0, x * hi // shard.num_tokens - _BLOCK // 2), hi - _BLOCK)
            block = self._ends(shard, first, _BLOCK)
            if block[0] <= x < block[-1]:
                i = int(np.searchsorted(block, x, side="right"))
                return first + i, block[i:]
            lo, hi = (first + _BLOCK, hi) if block[-1] <= x else (lo, first)
        fd = self._fd(shard.idx_path)
        while hi - lo > _BLOCK:
            mid = (lo + hi) // 2
            if int.from_bytes(os.pread(fd, 8, 8 * mid), "little", signed=True) > x:
                hi = mid
            else:
                lo = mid + 1
        block = self._ends(shard, lo, min(_BLOCK, shard.num_documents - lo))
        i = int(np.searchsorted(block[: hi - lo], x, side="right"))
        return lo + i, block[i:]

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Offsets p in (start, stop), relative to start, where a new document begins at start + p."""
        found = []
        k = bisect.bisect_right(self._starts, start) - 1
        while k < len(self._shards) and self._shards[k].start < stop:
            shard = self._shards[k]
            local_stop = stop - shard.start
            i, ends = self._ends_from(shard, start - shard.start)
            while True:
                inside = ends[: np.searchsorted(ends, local_stop, side="left")]
                if len(inside):
                    found.append(inside + (shard.start - start))
                i += len(ends)
                if len(inside) < len(ends) or i >= shard.num_documents:
                    break
                ends = self._ends(shard, i, min(_BLOCK, shard.num_documents - i))  # a window of many tiny documents
            k += 1
        if not found:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(found)

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
