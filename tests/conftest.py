import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty Pyro param store and its own thread count."""
    pyro.clear_param_store()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    yield
    pyro.clear_param_store()


@pytest.fixture
def one_thread():
    """Many steps on small tensors (solvers, chains, tiny flows): on 2 shared cores a second intra-op
    thread costs more than it saves (sdeint ran 10x slower, a softmax over (2000, 2) 80x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
