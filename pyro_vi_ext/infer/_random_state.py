"""The global random generators' state, captured and restored in one place.

The chunked loss (:mod:`pyro_vi_ext.infer._chunked`) replays each chunk from the state recorded
before it; the compiled paths (:mod:`pyro_vi_ext.infer._compiled`) restore the state after a
capture, whose draws no caller sees. Both need the same generators: torch's CPU and initialized
CUDA generators (Pyro draws from torch's), Python's and NumPy's legacy global ones (user code).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GlobalRandomState:
    """The global random generators' states: torch (CPU, initialized CUDA), Python, NumPy."""

    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...]
    python: object
    numpy: object

    @classmethod
    def capture(cls) -> GlobalRandomState:
        """Return the current state of every global generator."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            torch.get_rng_state(),
            tuple(torch.cuda.get_rng_state_all()) if cuda else (),
            random.getstate(),
            np.random.get_state(),  # noqa: NPY002 - the legacy global stream user code draws
        )

    def restore(self) -> None:
        """Put every global generator back to this state."""
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(list(self.torch_cuda))
        random.setstate(self.python)
        np.random.set_state(self.numpy)  # noqa: NPY002 - as above


@contextlib.contextmanager
def same_random_state() -> Iterator[None]:
    """Restore every global generator on exit (the block's draws are seen by no caller).

    Examples
    --------
    >>> before = torch.get_rng_state()
    >>> with same_random_state():
    ...     _ = torch.randn(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
    """
    state = GlobalRandomState.capture()
    try:
        yield
    finally:
        state.restore()
