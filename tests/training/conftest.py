"""Fixtures shared by the tests under tests/training."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny-tensor training loops run fastest on one intra-op thread (no contention on a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
