"""Packed sequences: window i of a token stream is tokens [i*L, i*L + L + 1), across document ends.

Windows overlap by one token so that every token but the first is a label exactly once. Document ids
mark, per input token, which document of the window it belongs to (0 for the one the window starts
in); the end-of-text token belongs to the document it closes, so a new id begins right after it.
"""

from __future__ import annotations

import numpy as np

from smoltrain.data.shards import TokenSource
from smoltrain.errors import DataError


class PackedDataset:
    def __init__(self, source: TokenSource, seq_len: int):
        self.source = source
        self.seq_len = seq_len
        self.num_sequences = (source.num_tokens - 1) // seq_len
        if self.num_sequences <= 0:
            raise DataError(
                f"{source.folder}: {source.num_tokens} tokens, fewer than one sequence of {seq_len} + 1"
            )

    def __len__(self) -> int:
        return self.num_sequences

    def prefetch(self, index: int) -> None:
        self.source.prefetch(index * self.seq_len, self.seq_len + 1)

    def fill(self, index: int, tokens: np.ndarray, document_starts: np.ndarray) -> None:
        """Write window `index` into tokens [L + 1] (int64) and mark document starts in [L] (zeros)."""
        start = index * self.seq_len
        self.source.read(start, tokens)
        document_starts[self.source.document_starts(start, start + self.seq_len)] = 1


def assemble_batch(tokens: np.ndarray, document_starts: np.ndarray) -> dict:
    """[B, L+1] tokens + [B, L] start marks -> the batch dict (input_ids, labels, document_ids)."""
    import torch

    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])),
        "document_ids": torch.from_numpy(np.cumsum(document_starts, axis=1, dtype=np.int32)),
    }


def batch_of_windows(dataset: PackedDataset, indices: list[int]) -> dict:
    tokens = np.empty((len(indices), dataset.seq_len + 1), dtype=np.int64)
    starts = np.zeros((len(indices), dataset.seq_len), dtype=np.int32)
    for row, index in enumerate(indices):
        dataset.fill(index, tokens[row], starts[row])
    return assemble_batch(tokens, starts)
