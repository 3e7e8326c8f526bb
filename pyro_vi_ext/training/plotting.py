"""Plots of a :func:`~pyro_vi_ext.training.fit` history."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .result import FitResult

__all__ = ["plot_history"]

_SKIP = frozenset({"step", "epoch"})
_NOT_BY_DEFAULT = frozenset({"loss", "lr", "grad_norm", "loss_total"})
# Totals over different numbers of rows (N training, M held-out): never drawn on one axis.
_NO_EVAL_OVERLAY = frozenset({"loss_total"})


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    valid = np.convolve(y, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), valid])


def plot_history(
    result: FitResult | Mapping[str, np.ndarray],
    keys: Iterable[str] | None = None,
    *,
    smooth: int = 1,
    logy: bool | Iterable[str] = False,
    ncols: int = 2,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Draw the training history: one panel per quantity, against the step.

    Each panel shows the per-step values (faint when smoothed), their moving average over
    ``smooth`` steps, and, given a :class:`FitResult` with evaluation, the held-out value
    ``eval_<key>`` at the end of each evaluated epoch as markers. Like is plotted with like:
    ``loss`` and ``eval_loss`` are both per data point (training loss over ``N`` rows divided by
    ``N``, held-out loss over ``M`` rows divided by ``M``), so their gap is the generalization gap
    in nats per point; the totals (``loss_total``, over different ``N`` and ``M``) are never
    overlaid.

    Parameters
    ----------
    result : FitResult or Mapping of str to numpy.ndarray
        A :class:`FitResult`, or a per-step history mapping such as ``result.history``.
    keys : iterable of str, optional
        Quantities to draw; default: ``loss``, every term, ``grad_norm`` if present and ``lr``
        (``eval_*`` keys of the epoch history and ``loss_total`` may be named too).
    smooth : int
        Moving-average window in steps (1 draws the raw values only).
    logy : bool or iterable of str
        ``True`` for log scale on every panel, or the keys whose panel gets one.
    ncols : int
        Panels per row.
    figsize : tuple of float, optional
        Figure size in inches; default scales with the number of panels.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.

    Examples
    --------
    >>> # fig = plot_history(result, smooth=50); fig.savefig("history.png")
    """
    import matplotlib.pyplot as plt

    if hasattr(result, "history"):
        steps_hist: Mapping[str, np.ndarray] = result.history  # type: ignore[union-attr]
        epoch_hist: Mapping[str, np.ndarray] = result.epoch_history  # type: ignore[union-attr]
    elif isinstance(result, Mapping):
        steps_hist, epoch_hist = result, {}
    else:
        raise TypeError(
            f"`result` must be a FitResult or a history mapping; got {type(result).__name__}"
        )
    if "loss" not in steps_hist and not epoch_hist:
        raise ValueError("`result` has no history to plot")
    if keys is None:
        order = ["loss"] + [k for k in steps_hist if k not in _SKIP | _NOT_BY_DEFAULT]
        order += [k for k in ("grad_norm", "lr") if k in steps_hist]
        keys = [k for k in order if k in steps_hist]
    keys = list(keys)
    for k in keys:
        if k not in steps_hist and k not in epoch_hist:
            raise KeyError(
                f"no history named {k!r}; available: {sorted(set(steps_hist) | set(epoch_hist))}"
            )
    if not keys:
        raise ValueError("`keys` is empty")
    log_keys = set(keys) if logy is True else (set() if logy is False else set(logy))
    nrows = math.ceil(len(keys) / ncols)
    ncols = min(ncols, len(keys))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=figsize or (5.0 * ncols, 3.2 * nrows),
        squeeze=False,
        constrained_layout=True,
    )
    x = steps_hist.get("step")
    for ax, key in zip(axes.flat, keys, strict=False):
        plotted = False
        if key in steps_hist:
            y = np.asarray(steps_hist[key], dtype=float)
            xs = x if x is not None else np.arange(1, len(y) + 1)
            if smooth > 1:
                ax.plot(xs, y, color="C0", alpha=0.25, lw=0.8, label=f"{key} (step)")
                ax.plot(
                    xs,
                    _moving_average(y, smooth),
                    color="C0",
                    lw=1.5,
                    label=f"{key} ({smooth}-step mean)",
                )
            else:
                ax.plot(xs, y, color="C0", lw=1.0, label=key)
            plotted = True
        eval_key = key if key.startswith("eval_") else f"eval_{key}"
        if eval_key in epoch_hist and "step" in epoch_hist and key not in _NO_EVAL_OVERLAY:
            ey = np.asarray(epoch_hist[eval_key], dtype=float)
            keep = ~np.isnan(ey)
            if keep.any():
                ax.plot(
                    np.asarray(epoch_hist["step"])[keep],
                    ey[keep],
                    "o-",
                    color="C1",
                    ms=4,
                    label=eval_key,
                )
                plotted = True
        if not plotted and key in epoch_hist:
            ax.plot(epoch_hist["step"], epoch_hist[key], "o-", color="C1", ms=4, label=key)
        ax.set_title(key)
        if key == "loss":
            ax.set_ylabel("per data point")
        ax.set_xlabel("step")
        if key in log_keys:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return fig
