"""Preference pairs prepared once, on disk: rows -> one token shard per input file holding each pair's
prompt, chosen and rejected ids back to back, cached by a hash of the inputs and settings, read with pread.

Tokenization is TRL's (post/preference/data.py's iter_pairs, streamed: no list of rows or pairs), one
file per worker process as for SFT data (sft_prepare.run_file_tasks); the cache folder is made the same
way (sft_prepare.build_once: a temporary name renamed when complete, the other ranks of the node
waiting). A pair costs 16 bytes of memory (its start and two lengths); its tokens stay on disk until a
batch needs them.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from smoltrain.data.readers import input_fingerprint, is_dataset_folder
from smoltrain.data.shards import ShardWriter, TokenSource, file_sha256, shard_name, token_dtype, write_meta
from smoltrain.errors import DataError
from smoltrain.post.preference.data import Pair, TextTokenizer, chat_render, iter_pairs
from smoltrain.post.sft.prepare import build_once, report_progress, run_file_tasks

FORMAT_VERSION = 1
INDEX = "pairs.npz"
_PROGRESS_EVERY = 256  # pairs between a worker's progress reports


def _tokenizer_files(path: Path) -> list[Path]:
    """The files that decide a pair's tokens: the tokenizer, and the config and template beside it."""
    folder = path if path.is_dir() else path.parent
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    beside = [folder / n for n in names if (folder / n).is_file()]
    return beside if path.is_dir() else list(dict.fromkeys([path, *beside]))


def cache_key(paths: list[Path], tokenizer: Path, template: str | None, max_length: int, skip_bad: bool,
              split: str | None = None) -> str:
    """A hash of the inputs (path, size, modification time; a dataset folder's files), the tokenizer's
    files and the settings."""
    for path in paths:
        if not path.is_file() and not is_dataset_folder(path):
            raise DataError(f"{path}: no such preference file")
    spec = {"version": FORMAT_VERSION, "template": template, "max_length": max_length, "skip_bad": skip_bad,
            "split": split, "files": [input_fingerprint(p) for p in paths],
            "tokenizer": {f.name: file_sha256(f) for f in _tokenizer_files(tokenizer)}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _pair_worker(tokenizer_path: str, template: str | None) -> dict:
    return {"tokenizer": TextTokenizer.load(tokenizer_path), "render": chat_render(tokenizer_path, template)}


def _pairs_file(task: dict, worker: dict) -> dict:
    """One preference file -> one shard of its pairs (prompt, chosen and rejected ids back to back), the
    pairs' prompt and chosen lengths, and the file's skipped rows by kind."""
    skipped: Counter = Counter()
    prompts, chosens = array.array("i"), array.array("i")  # 8 bytes a pair
    pairs = iter_pairs(Path(task["path"]), worker["tokenizer"], task["max_length"], task["skip_bad"], worker["render"], skipped,
                       task["split"])
    with ShardWriter(Path(task["folder"]), task["shard"], np.dtype(task["dtype"])) as writer:
        for n, (_, pair) in enumerate(pairs, start=1):
            writer.add_document(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)  # never empty: answers are not
            prompts.append(len(pair.prompt_ids))
            chosens.append(len(pair.chosen_ids))
            if n % _PROGRESS_EVERY == 0:
                report_progress(worker, _PROGRESS_EVERY)
        shard = writer.close() if writer.num_documents else writer.abort()
    return {"shard": shard, "prompt": np.frombuffer(prompts, dtype=np.int32), "chosen": np.frombuffer(chosens, dtype=np.int32),
            "skipped": dict(skipped)}


def _write(folder: Path, paths: list[Path], tokenizer_path: Path, template: str | None, max_length: int,
           skip_bad: bool, split: str | None, workers: int | None = None) -> None:
    """The files over worker processes (sft_prepare's scheme: one shard per file, so the folder does not
    depend on the number of workers), then meta.json and the pair index in file order."""
    from smoltrain.data.tokenizer import load_tokenizer, tokenizer_file_hash

    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    dtype = token_dtype(vocab_size)
    tasks = [{"path": str(path), "folder": str(folder), "shard": shard_name("pairs", i), "dtype": dtype.name,
              "max_length": max_length, "skip_bad": skip_bad, "split": split} for i, path in enumerate(paths)]
    results = run_file_tasks(tasks, _pairs_file, _pair_worker, (str(tokenizer_path), template), workers, True, "preference pairs")
    skipped: Counter = Counter()
    for result in results:
        skipped.update(result["skipped"])
    shards = [r["shard"] for r in results if r["shard"]]
    if not shards:
        detail = f" ({sum(skipped.values())} bad rows skipped)" if skipped else ""
        raise DataError(f"{', '.join(str(p) for p in paths)}: no preference pairs{detail}")
    write_meta(folder, shards=shards, dtype=dtype, vocab_size=vocab_size, tokenizer_hash=tokenizer_file_hash(tokenizer_path),
               skipped_records=dict(skipped), max_length=max_length, template=template)
    ends = np.concatenate([np.fromfile(folder / f"{s['name']}.idx", dtype=np.int64) + offset
                           for s, offset in zip(shards, np.cumsum([0] + [s["num_tokens"] for s in shards[:-1]]))])
    np.savez(folder / INDEX, ends=ends, prompt=np.concatenate([r["prompt"] for r in results]),
             chosen=np.concatenate([r["chosen"] for r in results]))


def prepare_pairs(paths: list[str | os.PathLike], tokenizer: str | os.PathLike, template: str | None, max_length: int,
                  skip_bad: bool, cache_dir: str | os.PathLike, split: str | None = None, workers: int | None = None) -> Path:
    """The prepared folder of these preference files and settings: found in the cache, else built
    (workers: processes over the files, default one a core)."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    files, tokenizer = [Path(p) for p in paths], Path(tokenizer)
    final = Path(cache_dir).expanduser() / "preference" / cache_key(files, tokenizer, template, max_length, skip_bad, split)
    return build_once(final, lambda tmp: _write(tmp, files, tokenizer, template, max_length, skip_bad, split, workers), INDEX)


class PairShards:
    """The pairs of a prepared folder as a sequence: pairs[i] (or a slice) is read from disk when asked."""

    def __init__(self, folder: Path):
        self.folder = folder
        with np.load(folder / INDEX) as index:
            self.ends, self.prompt, self.chosen = index["ends"], index["prompt"], index["chosen"]
        self.tokens = TokenSource(folder)
        self.skipped = Counter(self.tokens.meta.get("skipped_records", {}))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        start = int(self.ends[i - 1]) if i > 0 else 0
        ids = np.empty(int(self.ends[i]) - start, dtype=np.int64)
        self.tokens.read(start, ids)
        p, c = int(self.prompt[i]), int(self.chosen[i])
        ids = ids.tolist()
        return Pair(ids[:p], ids[p : p + c], ids[p + c :])


class PairSubset:
    """Some pairs of a sequence, by index (a held-out split) without copying them."""

    def __init__(self, pairs, indices: np.ndarray):
        self.pairs, self.indices = pairs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.pairs[int(j)] for j in self.indices[i]]
        return self.pairs[int(self.indices[i])]


def load_pairs(paths: list[str | os.PathLike], tokenizer: str | os.PathLike, template: str | None, max_length: int,
               skip_bad: bool, cache_dir: str | os.PathLike, split: str | None = None) -> PairShards:
    return PairShards(prepare_pairs(paths, tokenizer, template, max_length, skip_bad, cache_dir, split))


__all__ = ["PairShards", "PairSubset", "cache_key", "load_pairs", "prepare_pairs"]
