"""Callbacks for :func:`~pyro_vi_ext.training.fit`, and early stopping.

A callback is either a plain function ``fn(info: StepInfo) -> bool | None`` called after every
step, or a :class:`Callback` subclass overriding any of its hooks. Returning ``True`` from
``on_step_end`` or ``on_epoch_end`` stops training after the current step (the end-of-run
checkpoint is still written).

Examples
--------
>>> def print_every_100(info):
...     if info.step % 100 == 0:
...         print(info.step, info.values["loss"])
>>> stopper = EarlyStopping(monitor="eval_loss", patience=5)
>>> # fit(model, guide, x, loss, optim, num_epochs=50, eval_data=x_test,
>>> #     callbacks=[print_every_100, stopper])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyro
import torch

__all__ = ["Callback", "EarlyStopping", "EpochInfo", "FitInfo", "StepInfo"]


@dataclass(frozen=True)
class FitInfo:
    """What a callback learns when training starts.

    Attributes
    ----------
    start_step : int
        Completed steps before this call (non-zero when resuming).
    total_steps : int
        The step count training runs to.
    steps_per_epoch : int
        Optimizer steps in one epoch.
    n_data : int
        Size of the (global) training set.
    rank : int
        This process's rank (0 without data-parallel training).
    world_size : int
        Number of processes.
    """

    start_step: int
    total_steps: int
    steps_per_epoch: int
    n_data: int
    rank: int
    world_size: int


@dataclass(frozen=True)
class StepInfo:
    """The state after one optimizer step.

    Attributes
    ----------
    step : int
        Completed optimizer steps (this step's 1-based number).
    epoch : int
        The 0-based epoch this step belongs to.
    values : Mapping of str to float
        This step's history row: ``loss`` (per data point), ``loss_total``, ``lr``,
        ``grad_norm`` and every term the loss reported.
    """

    step: int
    epoch: int
    values: Mapping[str, float]


@dataclass(frozen=True)
class EpochInfo:
    """The state at the end of an epoch.

    Attributes
    ----------
    epoch : int
        Completed epochs (this epoch's 1-based number).
    step : int
        Completed optimizer steps.
    values : Mapping of str to float
        This epoch's history row: the epoch means of the step quantities (``loss``, terms),
        the learning rate at the end of the epoch and, on evaluation epochs, ``eval_loss`` (per
        held-out point), ``eval_loss_total`` and ``eval_<term>``.
    """

    epoch: int
    step: int
    values: Mapping[str, float]


class Callback:
    """Base class for callbacks; every hook is optional.

    ``state_dict`` / ``load_state_dict`` let a callback's state travel through checkpoints (return
    tensors, numbers, strings, lists and dicts only).

    Under data-parallel training every process runs the callbacks; a stop requested on any process
    stops all of them at the same step (one small all-reduce per step, skipped for callbacks whose
    ``rank_consistent`` attribute is ``True`` because they decide from the history alone, which is
    identical on all processes).
    """

    rank_consistent: bool = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints (default: the class's qualified name).

        Override it (a class attribute or a property) when two callbacks of one class carry
        different state that must not be swapped on resume; repeats of one key are told apart
        by position (``#2``, ``#3``).
        """
        return type(self).__qualname__

    def on_fit_start(self, info: FitInfo) -> None:
        """Run once before the first step.

        Parameters
        ----------
        info : FitInfo
            Start step, total steps, data size, rank.
        """

    def on_step_end(self, info: StepInfo) -> bool | None:
        """Run after every optimizer step.

        Parameters
        ----------
        info : StepInfo
            The step's number, epoch and history row.

        Returns
        -------
        bool or None
            ``True`` to stop training.
        """
        return None

    def on_epoch_end(self, info: EpochInfo) -> bool | None:
        """Run after every completed epoch (after evaluation).

        Parameters
        ----------
        info : EpochInfo
            The epoch's number, step and history row.

        Returns
        -------
        bool or None
            ``True`` to stop training.
        """
        return None

    def on_fit_end(self) -> None:
        """Run once when training stops, before the result is assembled."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state saved in checkpoints (tensors, numbers, strings, lists, dicts).

        Returns
        -------
        dict
            The state, stored under :attr:`state_key`.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`.

        Parameters
        ----------
        state : Mapping
            A dict returned by :meth:`state_dict` (after a checkpoint round trip).
        """


class _FunctionCallback(Callback):
    """A plain function ``fn(StepInfo) -> bool | None`` as a step callback."""

    def __init__(self, fn: Callable[[StepInfo], bool | None]):
        self.fn = fn

    @property
    def state_key(self) -> str:
        """The function's qualified name."""
        return getattr(self.fn, "__qualname__", type(self.fn).__qualname__)

    def on_step_end(self, info: StepInfo) -> bool | None:
        """Call the function."""
        return self.fn(info)

    def __repr__(self) -> str:
        """Name the function."""
        return f"callback {getattr(self.fn, '__name__', repr(self.fn))}"


def as_callback(obj: Any) -> Callback:
    """Wrap a plain function as a step callback; pass a :class:`Callback` through.

    Parameters
    ----------
    obj : Callback or callable
        An entry of ``fit``'s ``callbacks``.

    Returns
    -------
    Callback
        The callback.

    Raises
    ------
    TypeError
        For anything else.
    """
    if isinstance(obj, Callback):
        return obj
    if callable(obj):
        return _FunctionCallback(obj)
    raise TypeError(
        f"`callbacks` must hold Callback instances or functions; got {type(obj).__name__}"
    )


class EarlyStopping(Callback):
    """Stop when a monitored quantity has not improved for ``patience`` checks.

    Parameters
    ----------
    monitor : str
        A key of the epoch history (``interval="epoch"``; e.g. ``"eval_loss"``, ``"loss"`` (the
        epoch mean of the per-point training loss) or a term such as ``"eval_iw_bound"``) or of
        the step history (``interval="step"``).
    patience : int
        Checks without improvement tolerated before stopping.
    min_delta : float
        Smallest change that counts as an improvement.
    mode : {"min", "max"}
        Whether smaller or larger is better.
    interval : {"epoch", "step"}
        Check after each epoch (epochs without evaluation are skipped for ``eval_*`` keys) or
        after each step.
    restore_best : bool
        Put the parameters of the best check back into the param store when training stops
        (the optimizer state is not rolled back).

    Examples
    --------
    >>> stopper = EarlyStopping("eval_loss", patience=3, restore_best=True)
    >>> # result = fit(..., eval_data=x_test, callbacks=[stopper])
    >>> # result.stop_reason == "early_stopping" if it triggered
    """

    rank_consistent = True

    def __init__(
        self,
        monitor: str = "eval_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: Literal["min", "max"] = "min",
        interval: Literal["epoch", "step"] = "epoch",
        restore_best: bool = False,
    ):
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive integer; got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"`min_delta` must be non-negative; got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'; got {mode!r}")
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step'; got {interval!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.interval = interval
        self.restore_best = restore_best
        self.best: float = math.inf if mode == "min" else -math.inf
        self.best_step: int = -1
        self.wait: int = 0
        self.stopped_step: int | None = None
        self._best_params: dict[str, torch.Tensor] | None = None
        self.message: str = ""

    def _check(self, step: int, values: Mapping[str, float]) -> bool:
        if self.monitor not in values:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, which is not in the {self.interval} "
                f"history; available: {sorted(values)}"
            )
        value = float(values[self.monitor])
        if math.isnan(value):  # e.g. an epoch without evaluation
            return False
        better = (
            value < self.best - self.min_delta
            if self.mode == "min"
            else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_step, self.wait = value, step, 0
            if self.restore_best:
                self._best_params = {
                    name: p.detach().clone()
                    for name, p in pyro.get_param_store().named_parameters()
                }
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_step = step
            self.message = (
                f"early stopping at step {step}: {self.monitor} did not improve on "
                f"{self.best:.6g} (step {self.best_step}) for {self.wait} {self.interval}s"
            )
            return True
        return False

    def on_step_end(self, info: StepInfo) -> bool | None:
        """Check the monitored step quantity (``interval='step'``)."""
        if self.interval == "step":
            return self._check(info.step, info.values)
        return None

    def on_epoch_end(self, info: EpochInfo) -> bool | None:
        """Check the monitored epoch quantity (``interval='epoch'``)."""
        if self.interval == "epoch":
            return self._check(info.step, info.values)
        return None

    def on_fit_end(self) -> None:
        """Put the best parameters back when ``restore_best``."""
        if self.restore_best and self._best_params is not None:
            store = pyro.get_param_store()
            with torch.no_grad():
                for name, p in store.named_parameters():
                    if name in self._best_params:
                        p.copy_(self._best_params[name])

    def state_dict(self) -> dict[str, Any]:
        """Return best value, its step, the wait count and the best parameters."""
        return {
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "best_params": dict(self._best_params) if self._best_params is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        self.best = float(state["best"])
        self.best_step = int(state["best_step"])
        self.wait = int(state["wait"])
        self._best_params = state["best_params"]

    def __repr__(self) -> str:
        """Monitor, patience, mode and interval."""
        return (
            f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, "
            f"mode={self.mode!r}, interval={self.interval!r})"
        )
