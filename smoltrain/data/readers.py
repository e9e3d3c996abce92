"""Documents out of jsonl, jsonl.gz, parquet and plain-text files and `datasets` folders, streamed, with errors
that name file:line.

Every bad record (not JSON, no text key, not a string, empty, invalid UTF-8) is a DataError at its
line, or, with skip_bad, a counted skip; so are a file without documents and a truncated gzip stream
(whose records before the damage are kept). A `.json` file holds a list of records (or one record).
Plain text files (any other extension) are one document each. A folder is a Hugging Face dataset (what
`save_to_disk` wrote, or a snapshot of parquet shards), read through the `datasets` library by split.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from smoltrain.errors import DataError
from smoltrain.files import GZIP_ERRORS, gzip_or_plain

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Globs (recursive `**` allowed) -> sorted, de-duplicated files; a pattern that matches nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if m.is_file() or is_dataset_folder(m)]
        if not matches:
            raise DataError(f"{pattern}: no input file matches")
        files.extend(matches)
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def input_fingerprint(path: Path) -> list:
    """What a cache key needs to see a changed input: path, size and modification time of a file, and of
    every file inside a dataset folder (a folder's own mtime misses a rewritten shard)."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [str(path.resolve()), [[str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                  for f in files]]


def input_kind(path: Path) -> str:
    if path.is_dir():
        return "dataset"
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        return "json"
    return "text"


# ----------------------------------------------------------------------------- datasets folders


def is_dataset_folder(path: Path) -> bool:
    """A folder `Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote, or a dataset snapshot with parquet shards."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or next(path.rglob("*.parquet"), None) is not None
    )


def input_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file in a dataset folder (for progress and fingerprints)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _dataset_splits(folder: Path) -> dict:
    """Split name -> rows of a dataset folder. Saved datasets are memory-mapped; snapshots are streamed
    from their parquet files, so neither is copied into the `datasets` cache."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{folder}: reading a dataset folder needs the datasets package (pip install datasets)") from None
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.Dataset):  # one saved split; unnamed ones are "train", as on the Hub
                return {str(loaded.split or "train"): loaded}
            return dict(loaded)
        return dict(datasets.load_dataset(str(folder), streaming=True))
    except (ValueError, FileNotFoundError, OSError, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"{folder}: not a readable dataset folder ({str(e).splitlines()[0]})") from None


def dataset_rows(folder: str | os.PathLike, split: str | None = None) -> Iterator[dict]:
    """The rows (dicts) of one split of a dataset folder: `split`, else its only split, else 'train'.
    A split it does not have is a DataError listing the ones it has."""
    folder = Path(folder)
    splits = _dataset_splits(folder)
    if split is None:
        split = next(iter(splits)) if len(splits) == 1 else "train"
    if split not in splits:
        raise DataError(f"{folder}: no split '{split}' (splits: {', '.join(splits)}; choose one with --split or a split: key)")
    yield from splits[split]


def json_list_rows(path: str | os.PathLike) -> list[tuple[str, object]]:
    """("record N", row) of a .json file holding a list of rows (or one row), for the chat, preference
    and prompt readers (sft, dpo, generate), which read what `data tokenize` reads."""
    data = Path(path).read_bytes()
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        if data.lstrip()[:1] == b"{" and e.msg == "Extra data":
            raise DataError(f"{path}:{e.lineno}: one JSON object per line; name the file .jsonl") from None
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(parsed, (list, dict)):
        raise DataError(f"{path}: expected a JSON list of rows (or one row), got {type(parsed).__name__}")
    return [(f"record {n}", row) for n, row in enumerate(parsed if isinstance(parsed, list) else [parsed], start=1)]


class DocumentReader:
    """Iterate the texts of one file. `bytes_read` follows the position on disk (for progress bars)."""

    def __init__(self, path: str | os.PathLike, text_key: str = "text", skip_bad: bool = False, split: str | None = None):
        self.path = Path(path)
        self.text_key = text_key
        self.skip_bad = skip_bad
        self.split = split  # of a dataset folder
        self.kind = input_kind(self.path)
        self.size = input_size(self.path)
        self.bytes_read = 0
        self.documents = 0
        self.skipped: Counter[str] = Counter()

    def _bad(self, where: str, reason: str, kind: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{self.path}:{where}: {reason}")
        self.skipped[kind] += 1

    def __iter__(self) -> Iterator[str]:
        records = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "text": self._text,
                   "dataset": self._dataset}[self.kind]()
        for text in records:
            self.documents += 1
            yield text
        self.bytes_read = self.size
        if self.documents == 0:
            skipped = f" ({sum(self.skipped.values())} bad records skipped)" if self.skipped else ""
            if not self.skip_bad:
                raise DataError(f"{self.path}: no documents{skipped}")
            self.skipped["empty_file"] += 1  # a counted skip: the file gets no shard

    # ------------------------------------------------------------------------- formats

    def _jsonl(self) -> Iterator[str]:
        with open(self.path, "rb") as raw:
            stream = gzip_or_plain(raw)
            line_no = 0
            try:
                for line in stream:
                    line_no += 1
                    if line_no % 256 == 0:
                        self.bytes_read = raw.tell()
                    text = self._json_record(line, line_no)
                    if text is not None:
                        yield text
            except GZIP_ERRORS as e:
                if not self.skip_bad:
                    raise DataError(f"{self.path}:{line_no + 1}: unreadable gzip data ({e}); --skip-bad keeps "
                                    f"the {line_no} lines before it") from None
                # A truncated download: the lines before the damage are whole records; count the rest as one skip.
                self.skipped["truncated_gzip"] += 1

    def _json_record(self, line: bytes, line_no: int) -> str | None:
        if not line.strip():
            return None
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(line_no, f"invalid UTF-8 at byte {e.start} of the line", "invalid_utf8")
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as e:
            return self._bad(line_no, f"not valid JSON ({e.msg} at column {e.colno})", "not_json")
        return self._record_text(record, line_no)

    def _record_text(self, record, where) -> str | None:
        if not isinstance(record, dict):
            return self._bad(where, f"expected a JSON object, got {type(record).__name__}", "not_object")
        if self.text_key not in record:
            keys = ", ".join(list(record)[:8]) or "none"
            return self._bad(where, f"no '{self.text_key}' key (keys: {keys}; see --text-key)", "missing_key")
        return self._text_value(record[self.text_key], where)

    def _json(self) -> Iterator[str]:
        """A whole-file JSON document: a list of records (HF `to_json(lines=False)`), or one record."""
        data = self.path.read_bytes()
        try:
            parsed = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._bad(data[: e.start].count(b"\n") + 1, f"invalid UTF-8 at byte {e.start}", "invalid_utf8")
            return
        except json.JSONDecodeError as e:
            if data.lstrip()[:1] == b"{" and e.msg == "Extra data":
                raise DataError(f"{self.path}:{e.lineno}: one JSON object per line; name the file .jsonl") from None
            self._bad(e.lineno, f"not valid JSON ({e.msg} at column {e.colno})", "not_json")
            return
        records = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(parsed, (list, dict)):
            raise DataError(f"{self.path}: expected a JSON list of records (or one record), got {type(parsed).__name__}")
        for index, record in enumerate(records):
            text = self._record_text(record, f"record {index + 1}")
            if text is not None:
                yield text

    def _text_value(self, text, where) -> str | None:
        if not isinstance(text, str):
            return self._bad(where, f"'{self.text_key}' is {type(text).__name__}, not a string", "not_string")
        if not text:
            return self._bad(where, f"empty '{self.text_key}'", "empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from \ud800-style JSON escapes
            return self._bad(where, f"invalid UTF-8 (lone surrogate at character {e.start})", "invalid_utf8")
        return text

    def _parquet(self) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: not a readable parquet file ({e})") from None
        columns = parquet.schema_arrow.names
        if self.text_key not in columns:
            raise DataError(f"{self.path}: no column '{self.text_key}' (columns: {', '.join(columns)}; see --text-key)")
        row, total = 0, max(1, parquet.metadata.num_rows)
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=[self.text_key]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    text = self._text_value(value, f"row {row}")
                    if text is not None:
                        yield text
                self.bytes_read = self.size * row // total
        except pa.ArrowException as e:
            raise DataError(f"{self.path}: unreadable after row {row} ({e})") from None

    def _dataset(self) -> Iterator[str]:
        for row, record in enumerate(dataset_rows(self.path, self.split), start=1):
            text = self._record_text(record, f"row {row}")
            if text is not None:
                yield text

    def _text(self) -> Iterator[str]:
        data = self.path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            self._bad(line, f"invalid UTF-8 at byte {e.start}", "invalid_utf8")
            return
        self.bytes_read = self.size
        if text.strip():
            yield text
