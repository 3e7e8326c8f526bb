"""The immutable result of :func:`~pyro_vi_ext.training.fit` and the history it carries."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FitResult", "StopReason"]

StopReason = Literal["completed", "early_stopping", "callback", "interrupted", "non_finite"]

INT_COLUMNS = frozenset({"step", "epoch"})


class HistoryTable:
    """Column store for history rows; missing entries are NaN (mutable, internal)."""

    def __init__(self) -> None:
        self.cols: dict[str, list[float]] = {}
        self.n = 0

    def append(self, row: Mapping[str, float]) -> None:
        cols = self.cols
        for k, v in row.items():
            col = cols.get(k)
            if col is None:
                col = cols[k] = [math.nan] * self.n
            col.append(v)
        self.n += 1
        if len(row) != len(cols):
            for col in cols.values():
                if len(col) < self.n:
                    col.append(math.nan)

    def column(self, key: str, start: int = 0) -> list[float]:
        return self.cols[key][start:]

    def to_numpy(self) -> Mapping[str, np.ndarray]:
        out = {}
        for k, col in self.cols.items():
            arr = np.asarray(col, dtype=np.int64 if k in INT_COLUMNS else np.float64)
            arr.flags.writeable = False
            out[k] = arr
        return MappingProxyType(out)

    def to_state(self) -> dict[str, torch.Tensor]:
        return {
            k: torch.tensor(col, dtype=torch.int64 if k in INT_COLUMNS else torch.float64)
            for k, col in self.cols.items()
        }

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> HistoryTable:
        table = cls()
        lengths = {len(v) for v in state.values()}
        if len(lengths) > 1:
            raise ValueError("corrupt history in checkpoint: columns differ in length")
        table.n = lengths.pop() if lengths else 0
        table.cols = {
            k: [float(x) if k not in INT_COLUMNS else int(x) for x in v.tolist()]
            for k, v in state.items()
        }
        return table


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns (immutable, like NumPyro's ``SVIRunResult``).

    Attributes:
        params: Constrained values of every parameter in Pyro's param store at the end of
            training, detached copies keyed by name (after a non-finite loss: the values from
            before the failing step; with ``EarlyStopping(restore_best=True)``: the best ones).
        history: Per-step numpy arrays: ``step`` (1-based), ``epoch`` (0-based), ``loss``,
            ``lr`` (learning rate of the first parameter's optimizer), ``grad_norm`` (global L2
            norm of the gradients, before clipping) and every term reported by the loss in
            ``loss.last_terms`` under its own name (``term_<key>`` if the key is one of these).
            Under data-parallel training, the values are the global-batch values (averaged over
            processes, weighted by shard size).
        epoch_history: Per completed epoch: ``epoch`` (1-based), ``step``, the epoch means of
            ``loss`` and of the terms, ``lr`` at the end of the epoch, and ``eval_loss`` plus
            ``eval_<term>`` (NaN on epochs without evaluation).
        num_steps: Completed optimizer steps (counting those before a resume).
        num_epochs: Completed epochs.
        seed: The seed the run used (drawn at random and recorded when ``seed=None``).
        stop_reason: ``"completed"``, ``"early_stopping"``, ``"callback"``, ``"interrupted"``
            (KeyboardInterrupt) or ``"non_finite"`` (NaN or infinite loss or gradient).
        message: A human-readable account of how training ended.
        checkpoint: Path of the last checkpoint written or kept, or ``None``.
        world_size: Number of data-parallel processes.
        elapsed: Wall-clock seconds spent in this call.

    Example:
        >>> # result = fit(model, guide, x, Trace_ELBO(), Adam({"lr": 0.01}), num_steps=1000)
        >>> # result.history["loss"][-10:].mean(), result.params["AutoNormal.locs.w"]
        >>> # result.plot()
    """

    params: Mapping[str, torch.Tensor]
    history: Mapping[str, np.ndarray]
    epoch_history: Mapping[str, np.ndarray]
    num_steps: int
    num_epochs: int
    seed: int
    stop_reason: StopReason
    message: str
    checkpoint: str | None
    world_size: int
    elapsed: float

    @property
    def final_loss(self) -> float:
        """The loss of the last completed step (NaN if no step completed)."""
        loss = self.history.get("loss")
        return float(loss[-1]) if loss is not None and len(loss) else math.nan

    def plot(self, keys: Iterable[str] | None = None, **kwargs: Any) -> Figure:
        """Draw the history with :func:`~pyro_vi_ext.training.plot_history`."""
        from .plotting import plot_history

        return plot_history(self, keys=keys, **kwargs)
