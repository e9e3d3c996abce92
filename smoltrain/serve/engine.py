"""Continuous batching for the server: one thread decodes every running request together, one token
per step, and a new request joins the running batch at a step boundary.

A newcomer is prefilled alone, exactly as `generate` prefills one prompt, then its keys are placed
right-aligned in the shared cache (rows are left-padded, an additive -inf bias hides the padding) and
it decodes with the others; a row that stops leaves at once, and columns no row needs any more are cut.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from smoltrain.model.attention import attend_shared_prompt, left_padded_mask
from smoltrain.model.generate import PREFILL_CHUNK_ELEMENTS, sample_next
from smoltrain.model.transformer import KVCache

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server accepts (the app answers 503)."""


@dataclass
class Sequence:
    """One completion being generated. `emit(token)` runs on the engine thread for every new token and
    returns False when the caller wants no more (a stop string matched, the client left); `finish(reason)`
    runs once at the end: "stop" (a stop token, or emit said so), "length" (max_tokens), or "error"."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[int], bool]
    finish: Callable[[str], None]
    temperature: float = 0.0
    top_p: float | None = None
    stop_tokens: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    produced: int = 0  # tokens chosen so far
    cancelled: bool = False

    @property
    def position(self) -> int:
        """The position of the newest token, the next one fed: positions count from 0 at the prompt's start."""
        return len(self.prompt) + self.produced - 1


class BatchCache:
    """Keys and values of the running rows, shaped like KVCache's but with a row's own columns: rows are
    right-aligned at the newest column and `bias` (0 or -inf per row and column) hides each row's left
    padding. The model calls `attend` once per attention layer for a one-token decoding step and then
    advances `length`; the storage grows by doubling (no copy per step). A linear-attention layer
    (gated DeltaNet) keeps no keys but each row's conv and recurrent state, which padding never touches.
    A sliding-window layer keeps every column and reads the last window of them (rows are right-aligned,
    so one slice serves every row)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] | None = None  # per layer [rows, kv_heads, capacity, head_dim]; None: linear
        self.values: list[torch.Tensor | None] | None = None
        self.bias: torch.Tensor | None = None  # [rows, capacity], additive
        self.linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # linear layers: (conv state, recurrent state)
        self.length = 0  # columns in use (the model advances it after each forward)

    @property
    def rows(self) -> int:
        return 0 if self.bias is None else self.bias.shape[0]

    @property
    def device(self) -> torch.device:
        return self.bias.device

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """fn over every attention layer's keys and values (dim 0 rows, dim 2 columns)."""
        self.keys = [None if k is None else fn(k) for k in self.keys]
        self.values = [None if v is None else fn(v) for v in self.values]

    def add_row(self, prompt: KVCache) -> None:
        """Append a prefilled row: a one-prompt KVCache (per layer keys and values [1, kv_heads, len, head_dim],
        None for a linear layer, whose conv and recurrent states it holds instead)."""
        # prefill sized the prompt's cache to the prompt: its tensors are whole, and no one else holds them.
        prompt_len, keys, values, linear = prompt.length, prompt.keys, prompt.values, prompt.linear
        if self.bias is None:
            self.keys, self.values, self.linear = list(keys), list(values), dict(linear)
            self.bias = torch.zeros(1, prompt_len, dtype=prompt.dtype, device=prompt.device)
            self.length = prompt_len
            return
        if prompt_len > self.length:  # the newcomer is longer than every running row: pad them on the left
            self._pad_left(prompt_len - self.length)
        columns = slice(self.length - prompt_len, self.length)

        def placed(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
            if old is None:
                return None
            row = new.new_zeros(*new.shape[:2], old.shape[2], new.shape[3])
            row[:, :, columns] = new
            return torch.cat([old, row])

        self.keys = [placed(old, new) for old, new in zip(self.keys, keys)]
        self.values = [placed(old, new) for old, new in zip(self.values, values)]
        row_bias = torch.full((1, self.bias.shape[1]), float("-inf"), dtype=self.bias.dtype, device=self.bias.device)
        row_bias[:, columns] = 0.0
        self.bias = torch.cat([self.bias, row_bias])
        self.linear = {layer: (torch.cat([conv, linear[layer][0]]), torch.cat([state, linear[layer][1]]))
                       for layer, (conv, state) in self.linear.items()}

    def _pad_left(self, columns: int) -> None:
        def pad(x: torch.Tensor, dim: int, value: float) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = columns
            return torch.cat([x.new_full(shape, value), x], dim=dim)

        self._map(lambda x: pad(x, 2, 0.0))
        self.bias = pad(self.bias, 1, float("-inf"))
        self.length += columns

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every other row, then the leading columns that only dropped rows needed."""
        if not rows:
            self.keys = self.values = self.bias = None
            self.linear, self.length = {}, 0
            return
        index = torch.tensor(rows, device=self.device)
        self._map(lambda x: x.index_select(0, index))
        self.bias = self.bias.index_select(0, index)
        self.linear = {layer: (conv.index_select(0, index), state.index_select(0, index)) for layer, (conv, state) in self.linear.items()}
        needed = torch.isfinite(self.bias[:, : self.length]).any(dim=0).nonzero()
        first = int(needed[0]) if len(needed) else self.length
        if first > 0:
            self._map(lambda x: x[:, :, first:].contiguous())
            self.bias = self.bias[:, first:].contiguous()
            self.length -= first

    def reserve_column(self) -> None:
        """Room for one more column, visible to every row (the token about to be fed)."""
        if self.length == self.bias.shape[1]:
            grow = max(16, self.length)
            self._map(lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], grow, x.shape[3])], dim=2))
            self.bias = torch.cat([self.bias, self.bias.new_zeros(self.bias.shape[0], grow)], dim=1)
        self.bias[:, self.length] = 0.0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, window: int = 0) -> torch.Tensor:
        """One query per row against the row's stored columns (masked by bias) and its new key: the
        one-token decoding kernel `generate` uses (attend_shared_prompt, one "prompt" per row). A
        sliding-window layer (window > 0) reads the last window - 1 stored columns: with the new key, window."""
        stored = slice(max(self.length - window + 1, 0) if window > 0 else 0, self.length)
        out = attend_shared_prompt(q, self.keys[layer][:, :, stored], self.values[layer][:, :, stored],
                                   self.bias[:, None, None, stored], k, v)
        self.keys[layer][:, :, self.length] = k[:, :, 0]
        self.values[layer][:, :, self.length] = v[:, :, 0]
        return out

    def linear_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear[layer]

    def set_linear_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.linear[layer] = (conv, state)


@torch.no_grad()
def prefill(model: torch.nn.Module, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
    """(the KVCache of one prompt: per layer keys and values, linear layers' states; logits [1, vocab]), computed
    as `generate` computes a lone prompt's (same mask, positions and chunks): greedy replies then match it."""
    base = getattr(model, "_orig_mod", model)
    device = base.embed_tokens.weight.device
    ids = torch.tensor([prompt], device=device)
    real = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(len(prompt), device=device)[None]
    cache = KVCache(base.config, 1, len(prompt), device, dtype=base.embed_tokens.weight.dtype)
    chunk = max(1, PREFILL_CHUNK_ELEMENTS // base.config.vocab_size)
    for start in range(0, len(prompt), chunk):
        end = min(start + chunk, len(prompt))
        logits = model(ids[:, start:end], position_ids=positions[:, start:end],
                       attention_mask=left_padded_mask(real, start, end)[:, None], cache=cache, logits_to_keep=1)[:, -1]
    return cache, logits


class Engine:
    """The decoding thread: requests wait in a bounded queue, join the batch (up to max_batch rows) at a
    step boundary, and leave it when they finish. submit() is called from any thread."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self._waiting: deque[Sequence] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.running: list[Sequence] = []
        self.steps = 0  # decoding steps taken (a measure of batching: fewer steps for the same tokens)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none: QueueFull when they do not fit."""
        with self._ready:
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} completions are waiting (at most {self.max_queue})")
            self._waiting.extend(sequences)
            self._ready.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="smoltrain-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        cache = BatchCache(getattr(self.model, "_orig_mod", self.model).config.num_layers)
        logits = None
        while True:
            with self._ready:
                while not self._stopped and not self._waiting and not self.running:
                    self._ready.wait()
                if self._stopped:
                    break
                joining = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - len(self.running)))]
            try:
                logits = self._step(cache, logits, joining)
            except Exception:  # a bug must not leave clients waiting forever
                log.exception("serve: decoding failed; ending the running requests")
                for seq in self.running + [seq for seq in joining if seq not in self.running]:
                    seq.finish("error")
                self.running, logits = [], None
                cache = BatchCache(cache.num_layers)
        for seq in self.running + list(self._waiting):
            seq.finish("error")

    @torch.no_grad()
    def _step(self, cache: BatchCache, logits: torch.Tensor | None, joining: list[Sequence]) -> torch.Tensor | None:
        """Admit `joining`, choose every row's next token, drop finished rows, feed the rest one token."""
        rows = [logits] if logits is not None else []
        base = getattr(self.model, "_orig_mod", self.model)
        for seq in joining:
            if base.rope_cos.shape[0] < len(seq.prompt) + seq.max_tokens:  # as generate: extend, do not fail
                base.set_rope(max_seq_len=len(seq.prompt) + seq.max_tokens)
            prompt_cache, first = prefill(self.model, seq.prompt)
            cache.add_row(prompt_cache)
            rows.append(first)
            self.running.append(seq)
        if not self.running:
            return None
        logits = torch.cat(rows)
        tokens = [self._choose(seq, logits[i : i + 1]) for i, seq in enumerate(self.running)]
        keep = [i for i, (seq, token) in enumerate(zip(self.running, tokens)) if self._deliver(seq, token)]
        if len(keep) < len(self.running):
            cache.keep_rows(keep)
        self.running = [self.running[i] for i in keep]
        tokens = [tokens[i] for i in keep]
        if not self.running:
            return None
        device = cache.device
        cache.reserve_column()
        self.steps += 1
        return self.model(torch.tensor(tokens, device=device)[:, None],
                          position_ids=torch.tensor([seq.position for seq in self.running], device=device)[:, None],
                          cache=cache, logits_to_keep=1)[:, -1]

    @staticmethod
    def _choose(seq: Sequence, logits: torch.Tensor) -> int:
        """A row's next token, drawn as `generate` draws a lone prompt's (same generator use per step)."""
        return int(sample_next(logits, seq.temperature, None, seq.top_p, seq.generator)[0])

    @staticmethod
    def _deliver(seq: Sequence, token: int) -> bool:
        """Hand the token over; True while the row goes on."""
        if seq.cancelled:
            seq.finish("stop")
            return False
        seq.produced += 1
        if token in seq.stop_tokens:
            seq.finish("stop")
            return False
        if not seq.emit(token):
            seq.finish("stop")
            return False
        if seq.produced >= seq.max_tokens:
            seq.finish("length")
            return False
        return True


__all__ = ["BatchCache", "Engine", "QueueFull", "Sequence", "prefill"]
