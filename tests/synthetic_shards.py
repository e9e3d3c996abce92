"""Test data in the shard format without a tokenizer: random documents whose tokens tell their source."""

from pathlib import Path

import numpy as np

from smoltrain.data.shards import ShardWriter, shard_name, write_meta


def write_random_documents(folder: Path, name: str, low: int, high: int, num_tokens: int = 6000, seed: int = 0) -> None:
    """Documents of 10-60 tokens drawn from [low, high), each closed by token 0 (end of text)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with ShardWriter(folder, shard_name(name, 0), np.uint16) as writer:
        written = 0
        while written < num_tokens:
            doc = rng.integers(low, high, size=int(rng.integers(10, 60)))
            doc[-1] = 0
            writer.add_document(doc)
            written += len(doc)
        shard = writer.close()
    write_meta(folder, shards=[shard], dtype=np.uint16, vocab_size=256, tokenizer_hash=None)
