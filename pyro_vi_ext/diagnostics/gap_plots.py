r"""Matplotlib plots of :class:`~pyro_vi_ext.diagnostics.gaps.InferenceGaps`.

Computation lives in :mod:`pyro_vi_ext.diagnostics.gaps`; this module only draws, and imports
the result type for annotations only, so neither module imports the other at load time.

References
----------
.. [1] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
   ICML 2018.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyro_vi_ext.diagnostics.gaps import InferenceGaps

__all__ = ["plot_inference_gaps"]

_COLORS = {
    "amortization": "tab:orange",
    "approximation": "tab:blue",
    "closed": "tab:cyan",
    "left": "tab:blue",
}


_MAX_LABELLED = 40  # more bars than this: no point labels on the x axis


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(8, 3.5))
    return ax


def plot_inference_gaps(gaps: InferenceGaps, kind: str = "bars", ax=None, max_points: int = 40):
    r"""Plot the inference gap of each data point split into its parts [1]_.

    ``kind="bars"``: one stacked bar per point (the ``max_points`` points with the largest
    inference gap, largest first, labelled by their index when at most 40): approximation gap
    at the bottom, amortization gap on top; with a richer family the approximation gap is split
    into the part the richer family closes and the part it leaves. ``kind="hist"``: histograms
    of the approximation and amortization gaps across all points.

    Parameters
    ----------
    gaps
        From :func:`pyro_vi_ext.diagnostics.inference_gaps`.
    kind
        ``"bars"`` or ``"hist"``.
    ax
        Matplotlib axes (a new figure when omitted).
    max_points
        Bars drawn at most (``kind="bars"``).

    Returns
    -------
    matplotlib.axes.Axes

    References
    ----------
    .. [1] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
       ICML 2018.

    Examples
    --------
    ::

        plot_inference_gaps(inference_gaps(vae.model, vae.guide, x_test[:64]), kind="hist")
    """
    if kind not in ("bars", "hist"):
        raise ValueError(f"kind must be 'bars' or 'hist', got {kind!r}")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}")
    ax = _axes(ax)
    approximation = np.asarray(gaps.approximation_gap, dtype=float)
    amortization = np.asarray(gaps.amortization_gap, dtype=float)
    if kind == "hist":
        bins = np.histogram_bin_edges(np.concatenate([approximation, amortization]), bins=30)
        ax.hist(
            approximation,
            bins=bins,
            alpha=0.6,
            color=_COLORS["approximation"],
            label="approximation gap",
        )
        ax.hist(
            amortization,
            bins=bins,
            alpha=0.6,
            color=_COLORS["amortization"],
            label="amortization gap",
        )
        ax.set_xlabel("nats")
        ax.set_ylabel("data points")
        ax.legend()
        return ax

    order = np.argsort(-(approximation + amortization))[:max_points]
    positions = np.arange(len(order))
    if gaps.richer_elbo is not None:
        left = np.asarray(gaps.richer_gap, dtype=float)[order]
        closed = approximation[order] - left
        ax.bar(positions, left, color=_COLORS["left"], label=f"left by {gaps.richer_family}")
        ax.bar(
            positions,
            closed,
            bottom=left,
            color=_COLORS["closed"],
            label=f"closed by {gaps.richer_family}",
        )
    else:
        ax.bar(
            positions,
            approximation[order],
            color=_COLORS["approximation"],
            label="approximation gap",
        )
    ax.bar(
        positions,
        amortization[order],
        bottom=approximation[order],
        color=_COLORS["amortization"],
        label="amortization gap",
    )
    ax.set_xticks(positions if len(order) <= _MAX_LABELLED else [])
    if len(order) <= _MAX_LABELLED:
        ax.set_xticklabels([str(i) for i in order], rotation=90, fontsize=7)
    ax.set_xlabel("data point (sorted by inference gap)")
    ax.set_ylabel("nats")
    ax.legend()
    return ax
