"""Deterministic mixture schedule: which source the n-th sequence of a stage comes from.

A closed form, not a random draw: source i gets round(n * its share of the sources not yet placed)
of the first n picks (nested Bresenham lines, integer arithmetic). Realised proportions are within
about one sequence per source of the weights at every n, and any n is answered in O(sources), so
skipping, resuming and rank slicing need no walk from the start.
"""

from __future__ import annotations

_RESOLUTION = 10**9  # weights are held as integers: exact and identical on every machine


class MixtureSchedule:
    def __init__(self, weights: dict[str, float]):
        total = sum(w for w in weights.values() if w > 0)
        if total <= 0:
            raise ValueError(f"mixture has no positive weight: {weights}")
        # Heaviest first: each level then splits off the largest share, which keeps errors smallest.
        items = sorted(((n, w) for n, w in weights.items() if w > 0), key=lambda item: (-item[1], item[0]))
        self.names = [n for n, _ in items]
        self.weights = {n: w / total for n, w in items}
        scaled = [max(1, round(w / total * _RESOLUTION)) for _, w in items]
        # level i splits off source i from the sub-stream that sources i.. share
        self._levels = [(scaled[i], sum(scaled[i:])) for i in range(len(scaled))]

    @staticmethod
    def _count(m: int, part: int, whole: int) -> int:
        """round(m * part / whole), halves up, in integers."""
        return (2 * m * part + whole) // (2 * whole)

    def pick(self, n: int) -> tuple[str, int]:
        """(source, k): the n-th pick (0-based) is that source's k-th (0-based)."""
        m = n
        for name, (part, whole) in zip(self.names, self._levels):
            before = self._count(m, part, whole)
            if self._count(m + 1, part, whole) > before:
                return name, before
            m -= before  # index of this pick in the stream of the remaining sources
        raise AssertionError("the last level takes every pick")

    def counts(self, n: int) -> dict[str, int]:
        """How many of the first n picks went to each source."""
        out = {}
        m = n
        for name, (part, whole) in zip(self.names, self._levels):
            out[name] = self._count(m, part, whole)
            m -= out[name]
        return out
