import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Thousands of tiny ops: torch's intra-op thread pool costs more than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
