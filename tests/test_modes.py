"""`evaluating(model)`: eval mode inside the block, the mode before it afterwards, also after an exception."""

import pytest
import torch.nn as nn

from smoltrain.model.modes import evaluating


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_restores_the_previous_mode_even_when_the_block_raises(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with evaluating(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert all(m.training is training for m in model.modules())
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("a failed evaluation")
    assert all(m.training is training for m in model.modules())
