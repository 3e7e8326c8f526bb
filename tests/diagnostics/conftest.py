"""Fixtures of the diagnostics tests (the models themselves live in ``_toys``)."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from tests.diagnostics._toys import LocalToy, Regression, make_local_toy, make_regression

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread is faster on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def regression() -> Regression:
    """Provide the conjugate Bayesian linear regression toy."""
    return make_regression()


@pytest.fixture(scope="module")
def local_toy() -> LocalToy:
    """Provide the toy with one local latent per data point."""
    return make_local_toy()
