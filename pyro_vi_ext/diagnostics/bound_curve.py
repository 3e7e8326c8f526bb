r"""The importance-weighted bound :math:`\mathrm{IWAE}_K` as a function of ``K``.

From one pool of guide draws, :math:`\mathrm{IWAE}_K = \mathbb E \log \frac1K \sum_{k=1}^K w_k`
[1]_ for several ``K``: it starts at the ELBO (``K = 1``), is non-decreasing in expectation and
tends to :math:`\log p(x)`; how far it climbs measures the guide's ELBO gap.

References
----------
.. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pyro_vi_ext.diagnostics._repr import short_repr
from pyro_vi_ext.diagnostics._sampling import (
    LogMeanExp,
    VectorizeParticles,
    check_counts,
    collect_log_weights,
    prepare,
)
from pyro_vi_ext.infer._bounds import iwae_bound


@dataclass(frozen=True)
class BoundCurve:
    r"""The importance-weighted bound :math:`\mathrm{IWAE}_K` as a function of ``K``.

    Attributes
    ----------
    ks
        The ``K`` values.
    bound, se
        Per ``K``: the mean over ``S // K`` disjoint groups of ``K`` draws of
        :math:`\sum_n \log \frac1K \sum_{k} w_{n,k}` (summed over the evaluated data points; one
        term for a whole-trace model), and the standard error of that mean (NaN with one group).
        ``K = 1`` is the ELBO.
    num_groups
        Groups averaged per ``K``.
    log_evidence, log_evidence_se
        The estimate with all ``S`` draws (:func:`log_evidence` on the same draws).
    num_samples, num_points
        ``S`` and the number of evaluated data points.
    """

    ks: np.ndarray
    bound: np.ndarray
    se: np.ndarray
    num_groups: np.ndarray
    log_evidence: float
    log_evidence_se: float
    num_samples: int
    num_points: int

    def __repr__(self) -> str:
        return short_repr(self)

    def plot(self, ax=None):
        """Plot the curve: see :func:`pyro_vi_ext.diagnostics.plot_bound_vs_k`."""
        from pyro_vi_ext.diagnostics.plots import plot_bound_curve

        return plot_bound_curve(self, ax=ax)


def bound_curve_from_log_weights(
    log_weights: np.ndarray | torch.Tensor, ks: Sequence[int]
) -> BoundCurve:
    r"""Compute :math:`\mathrm{IWAE}_K` for every ``K`` in ``ks`` from given log weights.

    The ``S`` draws are split, for each ``K``, into ``S // K`` disjoint groups of ``K``;
    per group :math:`\sum_n \log \frac1K \sum_k w_{n,k}` [1]_, averaged over groups.

    Parameters
    ----------
    log_weights : numpy.ndarray or torch.Tensor
        ``[S]`` or ``[S, P]`` log importance weights, draws first.
    ks : sequence of int
        The ``K`` values, each in ``[1, S]``.

    Returns
    -------
    BoundCurve

    References
    ----------
    .. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.

    Examples
    --------
    >>> import numpy as np
    >>> curve = bound_curve_from_log_weights(np.zeros((100, 2)), ks=(1, 10))
    >>> curve.bound.tolist()
    [0.0, 0.0]
    """
    if isinstance(log_weights, torch.Tensor):
        log_weights = log_weights.detach().cpu().numpy()
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim == 1:
        log_weights = log_weights[:, None]
    num_samples, num_points = log_weights.shape
    ks = np.asarray(sorted({int(k) for k in ks}), dtype=np.int64)
    if ks.size == 0 or ks[0] < 1 or ks[-1] > num_samples:
        raise ValueError(f"every K must lie in [1, {num_samples}] (the draws), got {ks.tolist()}")
    bounds, ses, groups = [], [], []
    for k in ks:
        count = num_samples // k
        block = torch.as_tensor(log_weights[: count * k].reshape(count, k, num_points))
        per_group = iwae_bound(block).sum(-1).numpy()  # [groups]: sum over points
        bounds.append(per_group.mean())
        ses.append(per_group.std(ddof=1) / math.sqrt(count) if count > 1 else float("nan"))
        groups.append(count)
    accumulator = LogMeanExp()
    accumulator.update(log_weights)
    value, se, _ = accumulator.result()
    return BoundCurve(
        ks=ks,
        bound=np.asarray(bounds),
        se=np.asarray(ses),
        num_groups=np.asarray(groups),
        log_evidence=float(value.sum()),
        log_evidence_se=float(np.sqrt(np.square(se).sum())),
        num_samples=int(num_samples),
        num_points=int(num_points),
    )


def iw_bound_curve(
    model: Callable,
    guide: Callable,
    *args,
    ks: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    num_samples: int | None = None,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    **kwargs,
) -> BoundCurve:
    r"""Estimate :math:`\mathrm{IWAE}_K = \mathbb E \log \frac1K \sum_{k=1}^K w_k` over ``ks``.

    One pool of ``num_samples`` guide draws (default ``20 * max(ks)``) is split, for every ``K``,
    into disjoint groups of ``K``; the bound is the mean over groups (summed over data points) with
    its standard error. In expectation the curve is non-decreasing in ``K``, starts at the ELBO
    (``K = 1``) and tends to :math:`\log p(x)` [1]_; a flat curve near the ELBO means the guide is
    already close to the posterior, a long climb that the ELBO gap is large.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide, called with ``*args, **kwargs``.
    ks : sequence of int
        The ``K`` values.
    num_samples : int, optional
        Size of the pool of draws (default ``20 * max(ks)``).
    chunk_size : int
        Particles per vectorized run.
    max_plate_nesting : int, optional
        The model's plate nesting (guessed when omitted).
    vectorize_particles : bool or "auto"
        ``True``: each block of ``chunk_size`` draws is one run on a particle plate (the model
        must broadcast over a leftmost dim); ``False``: one model and guide run per draw, for
        models that do not broadcast (as Pyro's ``Predictive``); ``"auto"`` (default):
        vectorized unless one small vectorized run raises
        :class:`~pyro_vi_ext.infer._weights.ParticleVectorizationError`, then sequential with a
        :class:`~pyro_vi_ext.diagnostics.ParticleFallbackWarning`. Same results on the same
        draws either way.

    Returns
    -------
    BoundCurve

    References
    ----------
    .. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.

    Examples
    --------
    ::

        curve = iw_bound_curve(model, guide, x, ks=(1, 10, 100, 1000))
        curve.plot()
    """
    if num_samples is None:
        num_samples = 20 * max(int(k) for k in ks)
    check_counts(num_samples, chunk_size)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting, vectorize_particles)
    log_p, log_q, _ = collect_log_weights(setup, num_samples, chunk_size)
    return bound_curve_from_log_weights(log_p - log_q, ks)


__all__ = ["BoundCurve", "bound_curve_from_log_weights", "iw_bound_curve"]
