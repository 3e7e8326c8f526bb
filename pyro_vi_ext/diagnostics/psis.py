r"""PSIS k-hat: whether the guide is close enough to the posterior for importance sampling.

With draws :math:`z_s \sim q(z \mid x)` and log importance ratios
:math:`\log w_s = \log p(x, z_s) - \log q(z_s \mid x)`, the Pareto shape :math:`\hat k` of the
upper tail of :math:`w` [1]_ [2]_ says how far the importance-sampling estimates can be trusted:
below 0.5 good, up to :math:`\min(1 - 1/\log_{10} S, 0.7)` usable, above unreliable.

References
----------
.. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
   Inference", ICML 2018.
.. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
   Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pyro_vi_ext.diagnostics import _arviz_compat
from pyro_vi_ext.diagnostics._repr import short_repr
from pyro_vi_ext.diagnostics._sampling import (
    ProposalCheck,
    VectorizeParticles,
    check_counts,
    collect_log_weights,
    plate_names,
    prepare,
)
from pyro_vi_ext.infer._bounds import effective_sample_size


def khat_threshold(num_samples: int) -> float:
    r"""Return the sample-size dependent k-hat threshold :math:`\min(1 - 1/\log_{10} S, 0.7)`.

    Parameters
    ----------
    num_samples : int
        Number of draws ``S``.

    Returns
    -------
    float
        The threshold [2]_ (``-inf`` for ``S <= 10``, where no k-hat is reliable).

    References
    ----------
    .. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
       Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).

    Examples
    --------
    >>> round(khat_threshold(1000), 3)
    0.667
    """
    if num_samples <= 10:
        return float("-inf")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def _draws_ess(log_weights: np.ndarray) -> np.ndarray:
    """Effective sample size per point of ``[S, P]`` log weights (draws first), as numpy."""
    as_bound_input = torch.as_tensor(log_weights, dtype=torch.float64)[None]  # [1, S, P]
    return effective_sample_size(as_bound_input)[0].numpy()


def flag_point_mass(result: PSISResult, problem: str | None) -> PSISResult:
    """Mark a :class:`PSISResult` whose proposal has no spread (k-hat inf, ESS 1) and warn."""
    if problem is None:
        return result
    warnings.warn(problem, UserWarning, stacklevel=3)
    return replace(
        result,
        khat=np.full_like(result.khat, np.inf),
        ess=np.ones_like(result.ess),
        psis_ess=np.ones_like(result.psis_ess),
        proposal_problem=problem,
    )


@dataclass(frozen=True)
class PSISResult:
    r"""Pareto-smoothed importance sampling diagnostic of a guide.

    Attributes
    ----------
    khat
        ``[P]`` estimated Pareto shape :math:`\hat k` of the importance-weight tail, per data point
        (``P`` = elements of the data plates, flattened in C order, plates left to right), or one
        value for the whole trace (``P = 1``).
    ess
        ``[P]`` effective sample size of the raw weights, :math:`1 / \sum_s \tilde w_s^2` with
        :math:`\tilde w` the self-normalized weights (out of ``num_samples``).
    psis_ess
        ``[P]`` the same for the Pareto-smoothed weights.
    num_samples
        Number of guide draws ``S``.
    point_plates, point_shape
        Names and sizes of the data plates the values are per point of (empty: whole trace).
    log_weights
        ``[S, P]`` the raw log importance weights (float64).
    proposal_problem
        ``None``, or why the guide cannot serve as a proposal (a point mass, naming the sites);
        k-hat is then inf and the effective sample sizes 1.
    """

    khat: np.ndarray
    ess: np.ndarray
    psis_ess: np.ndarray
    num_samples: int
    point_plates: tuple[str, ...] = ()
    point_shape: tuple[int, ...] = ()
    log_weights: np.ndarray = field(default=None, repr=False)
    proposal_problem: str | None = None

    def __repr__(self) -> str:
        return short_repr(self)

    @property
    def threshold(self) -> float:
        r"""The sample-size dependent threshold :math:`\min(1 - 1/\log_{10} S, 0.7)`."""
        return khat_threshold(self.num_samples)

    @property
    def max_khat(self) -> float:
        """Largest k-hat over the data points (the k-hat itself for a whole-trace diagnostic)."""
        return float(np.max(self.khat))

    @property
    def is_per_point(self) -> bool:
        """Whether the diagnostic is per data point (local latents) rather than whole-trace."""
        return bool(self.point_plates)

    def fraction_above(self, threshold: float = 0.7) -> float:
        """Fraction of data points whose k-hat exceeds ``threshold``."""
        return float(np.mean(self.khat > threshold))

    def plot(self, ax=None, kind: str = "scatter"):
        """Plot k-hat across data points: see :func:`pyro_vi_ext.diagnostics.plot_khat`."""
        from pyro_vi_ext.diagnostics.plots import plot_khat

        return plot_khat(self, ax=ax, kind=kind)


def psis_from_log_weights(
    log_weights,
    *,
    point_plates: Sequence[str] = (),
    point_shape: Sequence[int] = (),
) -> PSISResult:
    r"""PSIS k-hat and effective sample sizes from log importance weights.

    Parameters
    ----------
    log_weights
        ``[S]`` (whole trace) or ``[S, P]`` (per point) log importance ratios
        :math:`\log p(x, z_s) - \log q(z_s \mid x)`, draws on the **first** axis. Torch tensors and
        numpy arrays are accepted. Zero weights (``-inf``) are allowed; NaN and ``+inf`` are not.
    point_plates, point_shape
        Optional names and sizes of the data plates, recorded on the result.

    Returns
    -------
    PSISResult

    Notes
    -----
    The generalized-Pareto fit is ArviZ's (``arviz.psislw`` in 0.23, ``arviz_stats`` in 1.x, with
    :math:`r_{\mathrm{eff}} = 1` since guide draws are independent): it fits the largest
    :math:`\lceil \min(S/5, 3\sqrt{S}) \rceil` ratios by the method of Zhang & Stephens (2009) with
    the weakly informative prior of Vehtari et al. [2]_. ArviZ reports ``inf`` when fewer than five
    draws lie above the tail cutoff (for example, exactly constant weights).

    References
    ----------
    .. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
       Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).

    Examples
    --------
    >>> import numpy as np
    >>> lw = np.random.default_rng(0).normal(size=(4000, 3))  # log-normal weights, mild tail
    >>> result = psis_from_log_weights(lw)
    >>> bool(result.max_khat < 0.7)
    True
    """
    if isinstance(log_weights, torch.Tensor):
        log_weights = log_weights.detach().cpu().numpy()
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim == 1:
        log_weights = log_weights[:, None]
    if log_weights.ndim != 2 or log_weights.shape[0] < 2:
        raise ValueError(f"log_weights must be [S] or [S, P] with S >= 2, got {log_weights.shape}")
    if np.isnan(log_weights).any() or np.isposinf(log_weights).any():
        raise ValueError("log importance weights contain NaN or +inf")
    if np.isneginf(log_weights).all(0).any():
        raise ValueError(
            "every draw has zero importance weight for some data point: the guide's draws fall "
            "where the model has zero density"
        )
    smoothed, khat = _arviz_compat.psislw(log_weights.T)
    return PSISResult(
        khat=np.atleast_1d(khat),
        ess=np.atleast_1d(_draws_ess(log_weights)),
        psis_ess=np.atleast_1d(_draws_ess(np.asarray(smoothed).T)),
        num_samples=int(log_weights.shape[0]),
        point_plates=tuple(point_plates),
        point_shape=tuple(int(s) for s in point_shape),
        log_weights=log_weights,
    )


def psis_diagnostic(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 4000,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    **kwargs,
) -> PSISResult:
    r"""PSIS k-hat of ``guide`` as an importance proposal for ``model``'s posterior [1]_ [2]_.

    Draws ``num_samples`` latents from the guide (in blocks of ``chunk_size``) and fits
    a generalized Pareto distribution to the upper tail of :math:`w_s = p(x, z_s) / q(z_s \mid x)`.
    With amortized local latents (every latent inside the data plate) the weights factorize over
    data points and k-hat is returned per point: its distribution across the dataset is the VAE
    diagnostic. With global latents it is one k-hat for the whole trace.

    Interpretation (Vehtari et al. 2024): :math:`\hat k < 0.5`: the weights have finite variance
    and q is close to the posterior; :math:`\hat k` up to :math:`\min(1 - 1/\log_{10} S, 0.7)`:
    importance sampling (and PSIS) estimates are usable; above: q misses posterior mass and
    neither q nor importance sampling from it can be trusted. k-hat is noisy: use thousands of
    draws. A guide wider than the posterior gives small k-hat; an under-dispersed one large.

    Parameters
    ----------
    model, guide
        Pyro model and (fitted) guide; called with ``*args, **kwargs``.
    num_samples
        Number ``S`` of guide draws.
    chunk_size
        Particles per vectorized run; lower it if a block does not fit in memory.
    max_plate_nesting
        The model's plate nesting (guessed by one run when omitted).
    vectorize_particles
        ``True``: each block of ``chunk_size`` draws is one run on a particle plate (the model
        must broadcast over a leftmost dim); ``False``: one model and guide run per draw, for
        models that do not broadcast (as Pyro's ``Predictive``); ``"auto"`` (default):
        vectorized unless one small vectorized run raises
        :class:`~pyro_vi_ext.infer._weights.ParticleVectorizationError`, then sequential with a
        :class:`~pyro_vi_ext.diagnostics.ParticleFallbackWarning`. Same results on the same
        draws either way.

    Returns
    -------
    PSISResult
        ``khat``, ``ess``, ``psis_ess`` per point (or whole trace) and the raw log weights.

    References
    ----------
    .. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
       Inference", ICML 2018.
    .. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
       Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).

    Examples
    --------
    ::

        result = psis_diagnostic(model, guide, x, num_samples=4000)
        print(result.max_khat, result.fraction_above(0.7))
        result.plot()          # k-hat across data points
    """
    check_counts(num_samples, chunk_size, minimum=2)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting, vectorize_particles)
    check = ProposalCheck()
    log_p, log_q, plates = collect_log_weights(setup, num_samples, chunk_size, check)
    names, shape = plate_names(plates)
    result = psis_from_log_weights(log_p - log_q, point_plates=names, point_shape=shape)
    return flag_point_mass(result, check.problem())


__all__ = [
    "PSISResult",
    "khat_threshold",
    "psis_diagnostic",
    "psis_from_log_weights",
]
