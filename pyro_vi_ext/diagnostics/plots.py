r"""Matplotlib plots of the guide diagnostics: k-hat across data points, bound versus K.

References
----------
.. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
   Inference", ICML 2018.
.. [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pyro_vi_ext.diagnostics._sampling import VectorizeParticles
from pyro_vi_ext.diagnostics.bound_curve import BoundCurve, iw_bound_curve
from pyro_vi_ext.diagnostics.psis import PSISResult

_COLORS = {"good": "tab:green", "ok": "tab:orange", "bad": "tab:red"}


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def plot_khat(result: PSISResult, ax=None, kind: str = "scatter"):
    r"""Plot PSIS k-hat across data points (or the single whole-trace value).

    ``kind="scatter"`` draws k-hat against the data-point index, coloured good (:math:`\le 0.5`),
    ok (up to the sample-size threshold :math:`\min(1 - 1/\log_{10} S, 0.7)`) and bad (above);
    ``kind="hist"`` draws its histogram across the dataset. Reference lines mark 0.5, 0.7 and the
    threshold [1]_.

    Parameters
    ----------
    result
        From :func:`psis_diagnostic` or :func:`psis_from_log_weights`.
    ax
        Matplotlib axes (a new figure when omitted).
    kind
        ``"scatter"`` or ``"hist"``.

    Returns
    -------
    matplotlib.axes.Axes

    References
    ----------
    .. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
       Inference", ICML 2018.

    Examples
    --------
    ::

        plot_khat(psis_diagnostic(vae.model, vae.guide, x_test), kind="hist")
    """
    if kind not in ("scatter", "hist"):
        raise ValueError(f"kind must be 'scatter' or 'hist', got {kind!r}")
    ax = _axes(ax)
    khat = np.asarray(result.khat, dtype=float)
    threshold = result.threshold
    finite = khat[np.isfinite(khat)]
    lines = sorted({0.5, 0.7, round(threshold, 3)})
    if kind == "scatter":
        category = np.where(khat <= 0.5, "good", np.where(khat <= threshold, "ok", "bad"))
        index = np.arange(khat.size)
        shown = np.where(np.isfinite(khat), khat, np.nan)
        for label, color in _COLORS.items():
            mask = category == label
            if mask.any():
                ax.scatter(index[mask], shown[mask], s=12, color=color, label=label)
        for line in lines:
            ax.axhline(line, color="0.5", linestyle=":", linewidth=1)
        where = " x ".join(result.point_plates) if result.point_plates else "whole trace"
        ax.set_xlabel(f"data point ({where})")
        ax.set_ylabel(r"PSIS $\hat k$")
        ax.legend(loc="best")
    else:
        ax.hist(finite, bins="auto", color="tab:blue", alpha=0.8)
        for line in lines:
            ax.axvline(line, color="0.3", linestyle=":", linewidth=1)
        ax.set_xlabel(r"PSIS $\hat k$")
        ax.set_ylabel("data points")
    ax.set_title(
        rf"PSIS $\hat k$ of the guide (S = {result.num_samples}, "
        f"{100 * result.fraction_above(threshold):.0f}% above {threshold:.2f})"
    )
    return ax


def plot_bound_curve(curve: BoundCurve, ax=None):
    """Plot a :class:`BoundCurve`: IWAE_K versus K with 2 standard errors, log-evidence band.

    Parameters
    ----------
    curve : BoundCurve
        From :func:`~pyro_vi_ext.diagnostics.iw_bound_curve` or
        :func:`~pyro_vi_ext.diagnostics.bound_curve_from_log_weights`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on (a new figure when omitted).

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    ::

        plot_bound_curve(iw_bound_curve(model, guide, x, ks=(1, 10, 100)))
    """
    ax = _axes(ax)
    per = curve.num_points if curve.num_points > 1 else 1
    bound, se = curve.bound / per, curve.se / per
    ax.errorbar(
        curve.ks,
        bound,
        yerr=2 * np.nan_to_num(se),
        marker="o",
        capsize=3,
        label=r"IW bound $\mathcal{L}_K$",
    )
    level, band = curve.log_evidence / per, 2 * curve.log_evidence_se / per
    ax.axhline(
        level,
        color="k",
        linestyle="--",
        linewidth=1,
        label=rf"$\log \hat p(x)$, S = {curve.num_samples}",
    )
    if np.isfinite(band):
        ax.axhspan(level - band, level + band, color="k", alpha=0.1)
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples per bound)")
    ax.set_ylabel("nats per data point" if per > 1 else "nats")
    ax.set_title("ELBO (K = 1) and importance-weighted bounds")
    ax.legend(loc="lower right")
    return ax


def plot_bound_vs_k(
    model: Callable,
    guide: Callable,
    *args,
    ks: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    num_samples: int | None = None,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    ax=None,
    **kwargs,
):
    r"""Plot the ELBO (``K = 1``) and IWAE_K bounds against ``K`` [2]_, with :math:`\log \hat p(x)`.

    Computes :func:`iw_bound_curve` (one pool of ``num_samples`` draws, default ``20 * max(ks)``)
    and draws mean :math:`\pm` 2 standard errors per ``K`` on a log axis, with the all-draws
    log-evidence estimate as a dashed line and band. Values are per data point for a model with
    data plates shared by all sites, else for the whole trace.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide, called with ``*args, **kwargs``.
    ks, num_samples, chunk_size, max_plate_nesting, vectorize_particles
        As in :func:`~pyro_vi_ext.diagnostics.iw_bound_curve`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on (a new figure when omitted).

    Returns
    -------
    matplotlib.axes.Axes

    References
    ----------
    .. [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.

    Examples
    --------
    ::

        ax = plot_bound_vs_k(model, guide, x, ks=(1, 10, 100, 1000))
    """
    curve = iw_bound_curve(
        model,
        guide,
        *args,
        ks=ks,
        num_samples=num_samples,
        chunk_size=chunk_size,
        max_plate_nesting=max_plate_nesting,
        vectorize_particles=vectorize_particles,
        **kwargs,
    )
    return plot_bound_curve(curve, ax=ax)


__all__ = ["plot_bound_curve", "plot_bound_vs_k", "plot_khat"]
