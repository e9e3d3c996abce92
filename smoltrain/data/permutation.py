"""A keyed bijection of [0, n): the sequence-level shuffle, computed and never stored.

A Feistel network over the smallest even number of bits that covers n, with cycle walking to stay
inside [0, n). It is a permutation by construction for any key, costs O(1) memory (the SmolLM3 run
lost throughput to an index that grew with the run), and a new key per epoch reshuffles.
"""

from __future__ import annotations

import hashlib

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap 64-bit hash with full avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_key(*parts) -> int:
    """A 64-bit key from any printable parts (seed, source name, epoch...), stable across runs."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class KeyedPermutation:
    """perm(i) for i in [0, n): a bijection chosen by `key`."""

    rounds = 6  # Luby-Rackoff: 4 rounds suffice for a pseudo-random permutation; 6 for small domains

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"permutation of an empty range (n={n})")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # 4**half_bits < 4n: <= 4 walks expected
        self.half_mask = (1 << self.half_bits) - 1
        self.round_keys = [mix64(key ^ mix64(r + 1)) for r in range(self.rounds)]

    def _encrypt(self, x: int) -> int:
        left, right, mask = x >> self.half_bits, x & self.half_mask, self.half_mask
        for k in self.round_keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << self.half_bits) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: the walk from i returns to [0, n) at a unique point
            x = self._encrypt(x)
        return x
