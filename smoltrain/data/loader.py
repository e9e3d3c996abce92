"""The training loader: a fixed global stream of packed sequences, split across data-parallel ranks.

Global sequence g (counted from the start of the run) is a pure function of the seed, the stage
history and g: the mixture schedule names the source and how many sequences that source has given
before, which picks an epoch and a slot in it, and a keyed permutation of the epoch picks the
window. So the state is a handful of integers, any rank can compute its own slice (rank r of W takes
g = r, r + W, ...), and restoring mid-epoch, skipping batches or re-splitting for another world size
are all O(1). Nothing here grows with the dataset or with the number of steps.
"""

from __future__ import annotations

import collections
from typing import Iterator

import numpy as np

from smoltrain.config import Config, DataConfig
from smoltrain.data.dataset import PackedDataset, assemble_batch, batch_of_windows
from smoltrain.data.mixture import MixtureSchedule
from smoltrain.data.permutation import KeyedPermutation, derive_key
from smoltrain.data.shards import TokenSource
from smoltrain.data.stages import resolve_stage, stage_at
from smoltrain.errors import ConfigError, DataError

STATE_VERSION = 1
_READ_AHEAD_SEQUENCES = 256  # windows handed to the OS ahead of use (page cache only, not our memory)


def _prepare(config: Config) -> DataConfig:
    data = config.data
    if data.embedded:
        from smoltrain.data.embedded import ensure_embedded_data

        data = ensure_embedded_data(data)
    return data


def _open_sources(data: DataConfig, folders: dict[str, str], vocab_size: int | None, what: str) -> dict[str, TokenSource]:
    sources = {name: TokenSource(folder) for name, folder in folders.items()}
    hashes = {s.tokenizer_hash for s in sources.values()} - {None}
    if len(hashes) > 1:
        listing = ", ".join(f"{n}={s.tokenizer_hash}" for n, s in sources.items())
        raise DataError(f"data.{what}: shards were made by different tokenizers ({listing})")
    if data.tokenizer and hashes:
        from smoltrain.data.tokenizer import tokenizer_file_hash

        expected = tokenizer_file_hash(data.tokenizer)
        if expected is not None and expected not in hashes:
            raise DataError(f"data.tokenizer {data.tokenizer} (hash {expected}) did not make the shards of data.{what} "
                            f"(hash {hashes.pop()})")
    for name, source in sources.items():
        if vocab_size is not None and source.vocab_size > vocab_size:
            raise ConfigError(
                f"model.vocab_size ({vocab_size}) is smaller than the vocabulary of data.{what}.{name} ({source.vocab_size})"
            )
    return sources


class TrainLoader:
    """`next_batch()` -> this rank's next micro-batch of CPU tensors (input_ids, labels, document_ids)."""

    def __init__(self, data: DataConfig, seed: int, micro_batch_size: int, dp_rank: int = 0, dp_world: int = 1,
                 vocab_size: int | None = None):
        if not data.sources:
            raise ConfigError("data.sources is empty: name token shard folders or set data.embedded: true")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside a world of {dp_world}")
        self.data = data
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.sources = _open_sources(data, data.sources, vocab_size, "sources")
        self._sequence = 0  # global sequences handed out to all ranks together
        self._stage_start = 0  # global sequence at which the current stage began
        self._segment = 0  # number of sequence-length changes so far: part of every permutation key
        self._base = {name: 0 for name in self.sources}  # draws per source before the current stage
        self._permutations: dict[tuple, KeyedPermutation] = {}
        # Read-ahead: (g, source, window) of this rank's next sequences, already handed to the OS.
        self._plan: collections.deque[tuple[int, str, int]] = collections.deque()
        self.read_ahead = max(_READ_AHEAD_SEQUENCES, 2 * micro_batch_size)
        self._configure(stage_at(data, 0))

    # ------------------------------------------------------------------------- stages

    def _configure(self, index: int) -> None:
        self._plan.clear()  # the plan was made for the old stage's mapping
        stage = resolve_stage(self.data, index)
        if not any(w > 0 for w in stage.mixture.values()):
            raise ConfigError(f"data mixture of stage {stage.name!r} has no positive weight")
        self.stage = index
        self.seq_len = stage.seq_len
        self.mixture = MixtureSchedule(stage.mixture)
        self.datasets = {n: PackedDataset(self.sources[n], self.seq_len) for n in self.mixture.names}

    def set_stage(self, index: int) -> None:
        """Switch to data.stages[index] (-1: the data section); sources continue where they were."""
        if index == self.stage:
            return
        for name, count in self.mixture.counts(self._sequence - self._stage_start).items():
            self._base[name] += count
        old_seq_len = self.seq_len
        self._stage_start = self._sequence
        self._configure(index)
        if self.seq_len != old_seq_len:
            # Windows of another length are other sequences: every source starts a fresh epoch of them.
            self._segment += 1
            self._base = {name: 0 for name in self.sources}

    # ------------------------------------------------------------------------- the global stream

    def _permutation(self, name: str, epoch: int) -> KeyedPermutation:
        cache_key = (name, self._segment, epoch, self.seq_len)
        perm = self._permutations.get(cache_key)
        if perm is None:
            if len(self._permutations) >= 16:  # ranks far apart in a huge world can straddle epochs
                self._permutations.clear()
            key = derive_key(self.seed, name, self._segment, epoch)
            perm = self._permutations[cache_key] = KeyedPermutation(self.datasets[name].num_sequences, key)
        return perm

    def locate(self, g: int) -> tuple[str, int, int]:
        """(source, epoch, window index) of global sequence g (g >= the current stage's start)."""
        name, k = self.mixture.pick(g - self._stage_start)
        k += self._base[name]
        epoch, slot = divmod(k, self.datasets[name].num_sequences)
        return name, epoch, self._permutation(name, epoch)(slot)

    def _planned(self, g: int) -> tuple[str, int]:
        """(source, window) of this rank's sequence g, from the read-ahead plan when it is there."""
        plan = self._plan
        while plan and plan[0][0] < g:  # skipped past
            plan.popleft()
        if plan and plan[0][0] == g:
            return plan.popleft()[1:]
        plan.clear()
        name, _, index = self.locate(g)
        return name, index

    def _read_ahead(self) -> None:
        """Plan this rank's next sequences and ask the OS to start reading them: random windows of a
        dataset larger than the page cache then overlap their disk reads instead of waiting one by one."""
        plan, step = self._plan, self.dp_world
        g = plan[-1][0] + step if plan else self._sequence + self.dp_rank
        while len(plan) < self.read_ahead:
            name, _, index = self.locate(g)
            self.datasets[name].prefetch(index)
            plan.append((g, name, index))
            g += step

    def next_batch(self) -> dict:
        B, L = self.micro_batch_size, self.seq_len
        tokens = np.empty((B, L + 1), dtype=np.int64)
        starts = np.zeros((B, L), dtype=np.int32)
        for row in range(B):
            name, index = self._planned(self._sequence + self.dp_rank + self.dp_world * row)
            self.datasets[name].fill(index, tokens[row], starts[row])
        self._sequence += B * self.dp_world
        if self.read_ahead:
            self._read_ahead()
        return assemble_batch(tokens, starts)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def skip(self, num_batches: int) -> None:
        """Advance past num_batches micro-batches (on every rank) without reading them."""
        self._sequence += num_batches * self.micro_batch_size * self.dp_world
        self._plan.clear()

    @property
    def sequences_consumed(self) -> int:
        return self._sequence

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """A handful of ints, identical on every rank, in global sequences (re-splittable)."""
        return {
            "version": STATE_VERSION,
            "stage": self.stage,
            "sequence": self._sequence,
            "stage_start": self._stage_start,
            "segment": self._segment,
            "base": dict(self._base),
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            if state["version"] != STATE_VERSION:
                raise DataError(f"loader state version {state['version']} (expected {STATE_VERSION})")
            stage, sequence, stage_start = int(state["stage"]), int(state["sequence"]), int(state["stage_start"])
            segment, base = int(state["segment"]), {str(k): int(v) for k, v in state["base"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"loader state is malformed ({e!r}): {state!r}") from None
        if not -1 <= stage < len(self.data.stages):
            raise DataError(f"loader state names stage {stage}, the config has {len(self.data.stages)} stages")
        self._sequence, self._stage_start, self._segment = sequence, stage_start, segment
        self._plan.clear()
        # A source added since the state was saved starts at its beginning.
        self._base = {name: base.get(name, 0) for name in self.sources}
        self._configure(stage)

    def fingerprint(self) -> dict[str, str]:
        """Per source, a hash of the data its position refers to (TokenSource.fingerprint)."""
        return {name: source.fingerprint() for name, source in self.sources.items()}

    def restart_sources(self, names: list[str]) -> None:
        """Positions in these sources start over (their data changed under the same name): the next
        window each gives is the first of a fresh epoch; other sources continue where they were."""
        drawn = self.mixture.counts(self._sequence - self._stage_start)
        for name in names:
            if name in self._base:
                self._base[name] = -drawn.get(name, 0)  # base + draws in this stage = 0 from here on
        self._plan.clear()

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def build_train_loader(config: Config, dp_rank: int = 0, dp_world: int = 1) -> TrainLoader:
    data = _prepare(config)
    return TrainLoader(
        data,
        seed=config.train.seed,
        micro_batch_size=config.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        vocab_size=config.model.vocab_size,
    )


def check_validation_data(config: Config) -> None:
    """Open every data.validation source with the checks its first evaluation makes (tokenizer, the
    model's vocabulary) and close it: a run stops before step 1, not at its first evaluation."""
    data = _prepare(config)
    for tokens in _open_sources(data, data.validation, config.model.vocab_size, "validation").values():
        tokens.close()


def validation_batches(config: Config, source: str, num_batches: int, batch_size: int) -> Iterator[dict]:
    """The first num_batches x batch_size windows (data.seq_len) of one source's validation shards,
    in order. Stops early, with a last smaller batch, when the split holds fewer windows."""
    data = _prepare(config)
    if source not in data.validation:
        known = ", ".join(data.validation) or "none"
        raise ConfigError(f"data.validation has no source {source!r} (known: {known})")
    tokens = _open_sources(data, {source: data.validation[source]}, config.model.vocab_size, "validation")[source]
    try:
        dataset = PackedDataset(tokens, data.seq_len)
        total = min(num_batches * batch_size, len(dataset))
        for first in range(0, total, batch_size):
            yield batch_of_windows(dataset, list(range(first, min(first + batch_size, total))))
    finally:
        tokens.close()
