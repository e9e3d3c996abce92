"""Ablations the playbook's way: one change at a time against a fixed baseline, the same data and
budget, several seeds, and a verdict per metric measured against the seed-to-seed spread.
"""

from smoltrain.ablate.grid import ablate  # noqa: E402  (the library function behind `smoltrain ablate`)

__all__ = ["ablate"]
