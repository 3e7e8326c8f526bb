import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Run the model tests on one intra-op thread, restoring the setting afterwards.

    Their tensors are tiny (a few images, a few schools), so thread synchronization dominates:
    on a busy two-core machine the conv VAE's steps ran about ten times faster on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
