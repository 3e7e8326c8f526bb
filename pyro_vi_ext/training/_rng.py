"""Seed streams of :func:`~pyro_vi_ext.training.fit`, all in one place.

A run has one seed. Every random number it uses comes from one of three streams derived from it,
so that no stream can shift another:

* the **training shuffling stream**: the order of the rows in each epoch, a function of
  ``(seed, epoch)`` only (:func:`shuffling_seed`), and the seed a ``DataLoader`` gets for its
  workers (:func:`loader_seed`);
* the **model-sampling stream**: the global torch, NumPy and Python generators that Pyro draws
  latent samples from during training (:func:`seed_model_sampling`); checkpoints save and restore
  its state (:func:`capture_rng_state`, :func:`restore_rng_state`);
* the **evaluation stream**: reseeded from ``(seed, epoch, rank)`` before every held-out
  evaluation (:func:`evaluation_seed`) and put back afterwards (:func:`isolated_rng`), so an
  evaluation neither depends on nor changes the training draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyro
import torch

__all__ = [
    "capture_rng_state",
    "derive_seed",
    "evaluation_seed",
    "isolated_rng",
    "loader_seed",
    "restore_rng_state",
    "seed_model_sampling",
    "shuffling_seed",
]

_SHUFFLING_STREAM = 0x5EED0
_LOADER_STREAM = 0x10AD
_EVALUATION_STREAM = 0xE7A1


def derive_seed(*words: int) -> int:
    """Derive a 63-bit seed from a tuple of non-negative integers.

    Parameters
    ----------
    *words : int
        The stream tag and its coordinates, e.g. ``(stream, seed, epoch)``.

    Returns
    -------
    int
        A seed in ``[0, 2**63)``; distinct tuples give unrelated seeds (NumPy's ``SeedSequence``
        hashing).

    Examples
    --------
    >>> derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    True
    """
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def shuffling_seed(seed: int, epoch: int) -> int:
    """Seed of the permutation of the rows in epoch ``epoch`` (the training shuffling stream).

    Parameters
    ----------
    seed : int
        The run's seed.
    epoch : int
        The 0-based epoch.

    Returns
    -------
    int
        The seed for a ``torch.Generator`` that draws the epoch's order.
    """
    return derive_seed(_SHUFFLING_STREAM, seed, epoch)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a ``DataLoader``'s own generator (worker seeds) for one epoch on one process.

    Parameters
    ----------
    seed : int
        The run's seed.
    epoch : int
        The 0-based epoch.
    rank : int
        The process's rank.

    Returns
    -------
    int
        The seed; a loader must not draw it from the global generator, or a run resumed
        mid-epoch would diverge from an uninterrupted one.
    """
    return derive_seed(_LOADER_STREAM, derive_seed(seed, epoch, rank))


def evaluation_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the held-out evaluation at the end of epoch ``epoch`` (the evaluation stream).

    Parameters
    ----------
    seed : int
        The run's seed.
    epoch : int
        The 0-based epoch whose end triggers the evaluation.
    rank : int
        The process's rank.

    Returns
    -------
    int
        A seed in ``[0, 2**32)`` for ``pyro.set_rng_seed``.
    """
    return derive_seed(_EVALUATION_STREAM, seed, epoch, rank) % 2**32


def seed_model_sampling(seed: int, rank: int) -> None:
    """Seed the global generators Pyro samples from (the model-sampling stream).

    Rank 0 uses ``seed`` itself, so a single-process run seeded with ``s`` draws what
    ``pyro.set_rng_seed(s)`` draws; other ranks get a derived seed of their own.

    Parameters
    ----------
    seed : int
        The run's seed.
    rank : int
        The process's rank.
    """
    pyro.set_rng_seed(seed if rank == 0 else derive_seed(seed, rank) % 2**32)


def capture_rng_state(cuda: bool) -> dict[str, Any]:
    """All global random states this process uses, as objects ``torch.load`` reads weights-only.

    Parameters
    ----------
    cuda : bool
        Include the CUDA generators' states.

    Returns
    -------
    dict
        Torch CPU (and CUDA) generator states, Python ``random`` and NumPy global states, as
        tensors, numbers and strings.
    """
    version, mersenne, gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # noqa: NPY002 - the global state is what Pyro seeds
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if cuda else [],
        "python_version": int(version),
        "python_state": torch.tensor(mersenne, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": str(np_name),
        "numpy_key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng_state`.

    Parameters
    ----------
    state : Mapping
        A dict returned by :func:`capture_rng_state` (possibly after a checkpoint round trip).
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(
        (
            state["python_version"],
            tuple(int(v) for v in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(  # noqa: NPY002
        (
            state["numpy_name"],
            state["numpy_key"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )


@contextmanager
def isolated_rng(cuda: bool, seed: int | None = None) -> Iterator[None]:
    """Run a block on its own random stream and put the global generators back afterwards.

    Parameters
    ----------
    cuda : bool
        Save and restore the CUDA generators too.
    seed : int, optional
        Seed the block with ``pyro.set_rng_seed(seed)``; ``None`` keeps the current state (the
        block's draws are then discarded from the stream's point of view).

    Examples
    --------
    >>> before = torch.get_rng_state()
    >>> with isolated_rng(cuda=False, seed=3):
    ...     _ = torch.randn(5)
    >>> torch.equal(before, torch.get_rng_state())
    True
    """
    # the generators' own state objects, kept in memory: no conversion to checkpointable tensors
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    python_state = random.getstate()
    numpy_state = np.random.get_state()  # noqa: NPY002 - the global state is what Pyro seeds
    try:
        if seed is not None:
            pyro.set_rng_seed(seed)
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
