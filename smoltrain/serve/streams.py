"""From the engine's tokens to a request's text: incremental decoding with stop strings, and the bridge
from the decoding thread to the request's asyncio task.

Text is sent once its characters are complete and once it can no longer turn out to be the start of a
stop string, so a streamed reply never shows what a stop cuts. A UTF-8 character spans up to 4 bytes,
which may come in several tokens: the last 3 U+FFFD of the text wait (an unfinished character decodes to
one per byte at most), earlier ones are bytes no later token can complete.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from smoltrain.serve.engine import Sequence

UNFINISHED_MAX = 3  # bytes of a UTF-8 character that may still be waiting for its last one


class TextStream:
    """Token ids in, text deltas out; `stopped` once a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far, up to the last complete character
        self.sent = 0  # characters of text handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        unfinished = min(UNFINISHED_MAX, len(text) - len(text.rstrip("\ufffd")))
        text = self.text = text[: len(text) - unfinished]
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._send(min(found))
        return self._send(len(text) - self._held_back(text))

    def close(self) -> str:
        """What is left once the sequence ends (a held-back tail that no stop string completed)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        self.text = text
        return self._send(len(text))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of text that begins some stop string."""
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
                   default=0)

    def _send(self, end: int) -> str:
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


@dataclass
class Event:
    """What a request's task receives: text of choice `index`, or (reason set) the end of that choice."""

    index: int
    text: str = ""
    reason: str | None = None
    tokens: int = 0  # completion tokens of the choice, with the end


class Job:
    """The n choices of one request. The engine thread calls emit / finish; the request's task reads
    `events()` (thread-safe through the event loop). cancel() lets the engine drop the rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer, stops: list[str], n: int):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.streams = [TextStream(tokenizer, stops) for _ in range(n)]
        self.tokens = [0] * n
        self.done = [False] * n
        self.sequences: list[Sequence] = []

    def add(self, index: int, **kwargs) -> Sequence:
        seq = Sequence(emit=lambda token: self._emit(index, token), finish=lambda reason: self._finish(index, reason),
                       **kwargs)
        self.sequences.append(seq)
        return seq

    def _emit(self, index: int, token: int) -> bool:
        self.tokens[index] += 1
        stream = self.streams[index]
        delta = stream.push(token)
        if delta:
            self._put(Event(index, delta))
        return not stream.stopped

    def _finish(self, index: int, reason: str) -> None:
        if self.done[index]:
            return
        self.done[index] = True
        tail = self.streams[index].close()
        self._put(Event(index, tail, reason, self.tokens[index]))

    def _put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
            pass

    async def events(self):
        """Every event until all choices have ended."""
        remaining = len(self.streams)
        while remaining:
            event = await self.queue.get()
            remaining -= event.reason is not None
            yield event

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancelled = True


__all__ = ["Event", "Job", "TextStream"]
