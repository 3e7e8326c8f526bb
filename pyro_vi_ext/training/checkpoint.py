"""Checkpoints of :func:`~pyro_vi_ext.training.fit`: their content, writing and reading.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs). It holds:

``format``
    ``"pyro_vi_ext.fit/1"``.
``step``, ``epoch``, ``step_in_epoch``, ``epoch_end_pending``
    Progress: completed optimizer steps, the current (0-based) epoch, the completed steps in it,
    and whether the end-of-epoch work for the last step is still to do.
``seed``, ``n_data``, ``batch_size``, ``steps_per_epoch``, ``world_size``
    The run's settings; a resume checks the data and batching still agree.
``params``
    ``{name: unconstrained value}`` for every parameter in Pyro's param store.
``optim``
    ``PyroOptim.get_state()``: per-parameter optimizer (and scheduler) state dicts.
``rng``
    One dict per process (rank order): torch CPU and CUDA generator states, Python ``random`` and
    NumPy global states, all as tensors and numbers.
``history``, ``epoch_history``
    ``{name: float64 tensor}``, the run's history so far.
``callbacks``
    ``[state_dict]`` of each callback, in the order they were passed.
``loss_state``
    The loss's ``state_dict()`` when it has one, else ``{}``.

Files are written atomically (to a temporary file, then renamed), and never with non-finite
parameters, so a crash while saving or a diverged run cannot destroy the last good checkpoint.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "pyro_vi_ext.fit/1"


def get_rng_state(cuda: bool) -> dict[str, Any]:
    """All global random states this process uses, as weights-only-loadable objects."""
    version, mt, gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # noqa: NPY002 - the global state is what Pyro seeds
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if cuda else [],
        "python_version": int(version),
        "python_state": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": str(np_name),
        "numpy_key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
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


def params_are_finite(params: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor in ``params`` is free of NaN and infinity."""
    return all(bool(torch.isfinite(p).all()) for p in params.values() if p.is_floating_point())


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> bool:
    """Write ``state`` to ``path`` atomically; refuse (warn, return False) on NaN/inf parameters.

    The file is first written next to ``path`` and then renamed over it, so ``path`` always holds
    either the previous or the new complete checkpoint.
    """
    if not params_are_finite(state["params"]):
        warnings.warn(
            f"checkpoint at step {state['step']} not written to {os.fspath(path)}: some "
            "parameters are NaN or infinite; the previous checkpoint is kept",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``fit`` with ``torch.load(..., weights_only=True)``.

    Example:
        >>> ckpt = load_checkpoint("run.pt")  # doctest: +SKIP
        >>> ckpt["step"], sorted(ckpt["params"])  # doctest: +SKIP

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a ``fit`` checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint written by pyro_vi_ext.fit")
    return state
