"""`with evaluating(model):` runs a block in eval mode and puts the model back in the mode it was in,
even when the block raises (the one home of what eight modules once wrote by hand).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off) inside the block; afterwards the previous train/eval mode of the whole model."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


__all__ = ["evaluating"]
