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
