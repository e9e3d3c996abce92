"""Small file helpers every package shares: an atomic writer and a YAML reader whose errors name the line.

Atomic: the content goes to a temporary name in the same folder, then `os.replace` moves it over the
target, so a reader (or a crash) sees the old file or the new one, never half of one. `durable`
adds the fsyncs a checkpoint marker needs to survive a power cut.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import yaml

from smoltrain.errors import ConfigError, DataError


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[Path], None], durable: bool = False) -> Path:
    """Write text (UTF-8), bytes, or whatever `content(tmp_path)` writes, to `path` atomically, making
    its folder when needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the writer failed: leave nothing that looks like data
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_yaml(path: str | os.PathLike, error: type[Exception] = ConfigError) -> Any:
    """The YAML document in `path`; a missing file or bad YAML is one line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    return parse_yaml(path.read_text(), str(path), error)


def parse_yaml(text: str, where: str, error: type[Exception] = ConfigError) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise error(f"{where}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def refuse_to_overwrite(path: str | os.PathLike, overwrite: bool, what: str = "--out") -> None:
    """A user's folder or file with something in it is replaced only when they said so (a new user once
    overwrote the train.init of a live SFT run with `import`)."""
    path = Path(path)
    full = path.is_file() and path.stat().st_size > 0 or path.is_dir() and any(path.iterdir())
    if full and not overwrite:
        raise ConfigError(f"{what} {path} is not empty: pass --overwrite to replace it, or choose another {what}")


@contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool, inputs=()) -> Iterator[Path]:
    """A temporary sibling folder to write into, moved onto `path` only when the writer finished (a
    failed write leaves the old folder as it was). A non-empty `path` needs overwrite. The folder's
    .yaml files that name the temporary folder (a model folder's config names its own tokenizer) are
    rewritten to name `path`. An input folder is never the output (the swap would delete it)."""
    path = Path(path)
    if any(Path(i).exists() and Path(i).resolve() == path.resolve() for i in inputs):
        raise ConfigError(f"--out {path}: the output folder must differ from the inputs")
    refuse_to_overwrite(path, overwrite)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp = staging / path.name  # the folder's own name from the start: a model card titles itself by it
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield tmp
        for config in tmp.glob("*.yaml"):
            text = config.read_text()
            if str(tmp.resolve()) in text:
                config.write_text(text.replace(str(tmp.resolve()), str(path.resolve())))
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["fsync_dir", "load_yaml", "output_folder", "parse_yaml", "refuse_to_overwrite", "write_atomic", "write_json"]


@dataclass(frozen=True)
class BadLine:
    """A .jsonl line that is not a JSON value: why, and the kind its --skip-bad counter uses."""

    reason: str
    kind: str


GZIP_ERRORS = (OSError, EOFError, zlib.error)  # what damaged or truncated gzip data raises while it is read


def gzip_or_plain(raw: BinaryIO) -> BinaryIO:
    """A binary file opened for reading, decompressed when it starts with gzip's magic bytes (the
    content decides, not the name: a .jsonl that is gzipped, or a .gz that is not, both read)."""
    gzipped = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value or a BadLine) of each non-blank line of a .jsonl file,
    gzipped or not (told by its magic bytes, not its name). Damaged gzip data is a DataError
    naming the line it stopped at."""
    path = Path(path)
    with open(path, "rb") as raw:
        stream = gzip_or_plain(raw)
        line_no = 0
        try:
            for line in stream:
                line_no += 1
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield line_no, BadLine(f"invalid UTF-8 at byte {e.start} of the line", "invalid_utf8")
                except json.JSONDecodeError as e:
                    yield line_no, BadLine(f"not valid JSON ({e.msg} at column {e.colno})", "not_json")
        except GZIP_ERRORS as e:
            raise DataError(f"{path}:{line_no + 1}: unreadable gzip data ({e})") from None
