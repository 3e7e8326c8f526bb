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
    """Column store for history rows; missing entries are NaN (mutable, internal).

    Attributes
    ----------
    cols : dict of str to list of float
        One list per history key, all of length ``n``.
    n : int
        Number of rows.
    """

    def __init__(self) -> None:
        self.cols: dict[str, list[float]] = {}
        self.n = 0

    def __repr__(self) -> str:
        return f"HistoryTable({self.n} rows: {', '.join(self.cols)})"

    def append(self, row: Mapping[str, float]) -> None:
        """Add a row; keys it lacks get NaN, new keys are NaN in earlier rows.

        Parameters
        ----------
        row : Mapping of str to float
            The row.
        """
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

    def to_numpy(self) -> Mapping[str, np.ndarray]:
        """Read-only numpy arrays (int64 for ``step``/``epoch``) in a read-only mapping.

        Returns
        -------
        Mapping of str to numpy.ndarray
            The columns.
        """
        out = {}
        for k, col in self.cols.items():
            arr = np.asarray(col, dtype=np.int64 if k in INT_COLUMNS else np.float64)
            arr.flags.writeable = False
            out[k] = arr
        return MappingProxyType(out)

    def to_state(self) -> dict[str, torch.Tensor]:
        """Convert the columns to tensors, for checkpoints.

        Returns
        -------
        dict of str to torch.Tensor
            ``int64`` for ``step``/``epoch``, ``float64`` otherwise.
        """
        return {
            k: torch.tensor(col, dtype=torch.int64 if k in INT_COLUMNS else torch.float64)
            for k, col in self.cols.items()
        }

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> HistoryTable:
        """Rebuild a table saved with :meth:`to_state`.

        Parameters
        ----------
        state : Mapping of str to torch.Tensor
            The saved columns.

        Returns
        -------
        HistoryTable
            The table.

        Raises
        ------
        ValueError
            If the columns differ in length.
        """
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


@dataclass(frozen=True, repr=False)
class FitResult:
    """What :func:`fit` returns (immutable, like NumPyro's ``SVIRunResult``).

    Losses are reported per data point: ``loss`` is the minibatch estimate of the full-data
    negative ELBO (or the loss's own objective) divided by the number of training rows ``N``,
    ``eval_loss`` the held-out loss divided by the number of held-out rows ``M``, so the two
    are on one scale (nats per point for ELBO losses). The totals are kept as ``loss_total``
    (an estimate over ``N`` rows) and ``eval_loss_total`` (over ``M`` rows).

    Attributes
    ----------
    params : Mapping of str to torch.Tensor
        Constrained values of every parameter in Pyro's param store at the end of training,
        detached copies keyed by name (after a non-finite loss: the values from before the
        failing step; with ``EarlyStopping(restore_best=True)``: the best ones).
    history : Mapping of str to numpy.ndarray
        Per-step read-only arrays: ``step`` (1-based), ``epoch`` (0-based), ``loss`` (per data
        point), ``loss_total``, ``lr`` (learning rate of the first parameter's optimizer),
        ``grad_norm`` (global L2 norm of the gradients before clipping) and every term the
        loss reports in ``loss.last_terms``, under its own name (``term_<key>`` for a reserved
        key). Under data-parallel training these are the global-batch values.
    epoch_history : Mapping of str to numpy.ndarray
        Per completed epoch: ``epoch`` (1-based), ``step``, the epoch means of the step
        quantities, ``lr`` at the end of the epoch, and ``eval_loss`` (per held-out point),
        ``eval_loss_total`` and ``eval_<term>`` (NaN on epochs without evaluation).
    num_steps : int
        Completed optimizer steps (counting those before a resume).
    num_epochs : int
        Completed epochs.
    seed : int
        The seed the run used (drawn at random and recorded when ``seed=None``).
    stop_reason : {"completed", "early_stopping", "callback", "interrupted", "non_finite"}
        Why training ended (``"interrupted"``: Ctrl-C / ``KeyboardInterrupt``;
        ``"non_finite"``: a NaN or infinite loss or gradient).
    message : str
        A human-readable account of how training ended (and what was resumed, and any
        checkpoint write that failed).
    checkpoint : str or None
        Path of the last checkpoint written or kept.
    world_size : int
        Number of data-parallel processes.
    elapsed : float
        Wall-clock seconds spent in this call.
    resumed_from : str or None
        The checkpoint this call resumed from.

    Examples
    --------
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
    resumed_from: str | None = None

    @property
    def final_loss(self) -> float:
        """The per-point loss of the last completed step (NaN if no step completed)."""
        loss = self.history.get("loss")
        return float(loss[-1]) if loss is not None and len(loss) else math.nan

    def __repr__(self) -> str:
        """Short summary: steps, epochs, stop reason, final losses and parameter shapes."""
        parts = [
            f"num_steps={self.num_steps}",
            f"num_epochs={self.num_epochs}",
            f"stop_reason={self.stop_reason!r}",
            f"final_loss={self.final_loss:.6g}",
        ]
        eval_loss = self.epoch_history.get("eval_loss")
        if eval_loss is not None:
            finite = eval_loss[~np.isnan(eval_loss)]
            if finite.size:
                parts.append(f"final_eval_loss={float(finite[-1]):.6g}")
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.params.items())[:6])
        more = len(self.params) - 6
        shapes += f", ... ({more} more)" if more > 0 else ""
        parts.append(f"params={{{shapes}}}")
        parts.append(f"history keys={sorted(self.history)}")
        parts.append(f"seed={self.seed}")
        if self.checkpoint:
            parts.append(f"checkpoint={self.checkpoint!r}")
        parts.append(f"elapsed={self.elapsed:.1f}s")
        return "FitResult(" + ", ".join(parts) + ")"

    def plot(self, keys: Iterable[str] | None = None, **kwargs: Any) -> Figure:
        """Draw the history with :func:`~pyro_vi_ext.training.plot_history`.

        Parameters
        ----------
        keys : iterable of str, optional
            Quantities to draw (default: per-point ``loss`` with ``eval_loss``, every term,
            ``grad_norm`` and ``lr``).
        **kwargs
            Passed to :func:`~pyro_vi_ext.training.plot_history`.

        Returns
        -------
        matplotlib.figure.Figure
            The figure.
        """
        from .plotting import plot_history

        return plot_history(self, keys=keys, **kwargs)
