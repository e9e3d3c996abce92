import pytest
import torch
from pretrain_helpers import write_two_sources


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: more intra-op threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Token shards of two sources for a tiny pretraining run (see pretrain_helpers)."""
    return write_two_sources(tmp_path_factory.mktemp("data"))
