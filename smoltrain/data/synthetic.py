"""Synthetic token shards of any size, for loader benchmarks and tests: random tokens, random lengths.

Written in chunks, so making 2 billion tokens needs no more memory than making 2 million.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from smoltrain.data.shards import ShardWriter, shard_name, token_dtype, write_meta


def write_synthetic_shards(out_dir: str | os.PathLike, num_tokens: int, *, vocab_size: int = 32768,
                           mean_document_tokens: int = 1024, shard_tokens: int = 100_000_000, seed: int = 0,
                           eot_token_id: int = 0, name: str = "synthetic", progress=None) -> dict:
    """Documents of geometric length (mean `mean_document_tokens`) ending in `eot_token_id`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    shards, written, index = [], 0, 0
    chunk = 1 << 22
    while written < num_tokens:
        size = min(shard_tokens, num_tokens - written)
        with ShardWriter(out, shard_name(name, index), dtype) as writer:
            done = 0
            while done < size:
                n = min(chunk, size - done)
                lengths = rng.geometric(1.0 / mean_document_tokens, size=n // 16 + 16)
                ends = np.cumsum(lengths)
                lengths = lengths[: np.searchsorted(ends, n) + 1]
                lengths[-1] -= int(lengths.sum()) - n  # the chunk ends on a document end
                lengths = lengths[lengths > 0]
                tokens = rng.integers(1, vocab_size, size=n, dtype=np.int64).astype(dtype)
                tokens[np.cumsum(lengths) - 1] = eot_token_id
                writer.add_documents(tokens, lengths)
                done += n
                if progress is not None:
                    progress(n)
            shards.append(writer.close())
        written += size
        index += 1
    return write_meta(out, shards=shards, dtype=dtype, vocab_size=vocab_size, tokenizer_hash=None,
                      eot_token_id=eot_token_id, synthetic={"seed": seed, "mean_document_tokens": mean_document_tokens})
