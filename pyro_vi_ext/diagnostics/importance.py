r"""The guide as an importance proposal: PSIS k-hat, log-evidence, resampling, bounds versus K.

A fitted guide :math:`q(z \mid x)` is a proposal for the posterior :math:`p(z \mid x)`. With draws
:math:`z_s \sim q` and log importance ratios

.. math::

    \log w_s = \log p(x, z_s) - \log q(z_s \mid x),

four questions have standard answers:

* *is q close enough for importance sampling?* The Pareto shape :math:`\hat k` of the upper tail
  of :math:`w` (Yao et al. 2018, Vehtari et al. 2024): below 0.5 good, up to
  :math:`\min(1 - 1/\log_{10} S, 0.7)` usable, above unreliable;
* *what is log p(x)?* :math:`\log \frac1S \sum_s w_s` (the IWAE bound with :math:`K = S`,
  Burda et al. 2016) with a delta-method standard error;
* *what posterior does q imply?* Sampling-importance-resampling from the draws by their weights
  (the importance-weighted posterior of Domke & Sheldon 2018);
* *how tight is the bound?* :math:`\mathrm{IWAE}_K` as a function of ``K``.

All are taken *per data point* when every latent lives in the data plate(s) (amortized local
latents, as in a VAE: the weights factorize over points), and over the *whole trace* otherwise
(global latents): see :mod:`pyro_vi_ext.infer._weights` for the plate bookkeeping. Draws run in
blocks of ``chunk_size`` vectorized particles under ``torch.no_grad``.

References
----------
.. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
   Inference", ICML 2018.
.. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
   Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).
.. [3] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
.. [4] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pyro_vi_ext.diagnostics import _arviz_compat
from pyro_vi_ext.diagnostics._sampling import (
    LogMeanExp,
    check_counts,
    collect_draws,
    collect_log_weights,
    gather,
    particle_blocks,
    prepare,
    resample_indices,
)
from pyro_vi_ext.infer._weights import ParticleWeights, PointPlate, common_user_scale


def khat_threshold(num_samples: int) -> float:
    r"""Sample-size dependent k-hat threshold :math:`\min(1 - 1/\log_{10} S, 0.7)` [2]_."""
    if num_samples <= 10:
        return float("-inf")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def _plate_names(plates: Sequence[PointPlate]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    return tuple(p.name for p in plates), tuple(p.size for p in plates)


def _ess(log_weights: np.ndarray, axis: int) -> np.ndarray:
    """``1 / sum(w_normalized^2)`` along ``axis``, computed in log space."""
    log_weights = np.asarray(log_weights, dtype=np.float64)
    shifted = log_weights - log_weights.max(axis, keepdims=True)
    normalized = np.exp(shifted) / np.exp(shifted).sum(axis, keepdims=True)
    return 1.0 / np.square(normalized).sum(axis)


# -- PSIS ----------------------------------------------------------------------------------------


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
    """

    khat: np.ndarray
    ess: np.ndarray
    psis_ess: np.ndarray
    num_samples: int
    point_plates: tuple[str, ...] = ()
    point_shape: tuple[int, ...] = ()
    log_weights: np.ndarray = field(default=None, repr=False)

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
        ess=np.atleast_1d(_ess(log_weights, axis=0)),
        psis_ess=np.atleast_1d(_ess(smoothed, axis=-1)),
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
    **kwargs,
) -> PSISResult:
    r"""PSIS k-hat of ``guide`` as an importance proposal for ``model``'s posterior [1]_ [2]_.

    Draws ``num_samples`` latents from the guide (in vectorized blocks of ``chunk_size``) and fits
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

    Returns
    -------
    PSISResult
        ``khat``, ``ess``, ``psis_ess`` per point (or whole trace) and the raw log weights.

    Examples
    --------
    ::

        result = psis_diagnostic(model, guide, x, num_samples=4000)
        print(result.max_khat, result.fraction_above(0.7))
        result.plot()          # k-hat across data points
    """
    check_counts(num_samples, chunk_size, minimum=2)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting)
    log_p, log_q, plates = collect_log_weights(setup, num_samples, chunk_size)
    names, shape = _plate_names(plates)
    return psis_from_log_weights(log_p - log_q, point_plates=names, point_shape=shape)


# -- log-evidence --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvidenceResult:
    r"""Importance-sampled estimate of the log-evidence :math:`\log p(x)`.

    Attributes
    ----------
    total, total_se
        :math:`\sum_n \log \hat p(x_n)` over the evaluated data points and its standard error
        :math:`\sqrt{\sum_n \mathrm{se}_n^2}` (points are independent). For a whole-trace model it
        is the single estimate.
    per_point, per_point_se
        ``[P]`` per data point (``P = 1`` whole trace), flattened in C order over ``point_plates``.
    ess
        ``[P]`` effective sample size :math:`(\sum_s w_s)^2 / \sum_s w_s^2` of the draws.
    num_samples
        Number ``S`` of guide draws.
    point_plates, point_shape
        Names and sizes of the data plates (empty for a whole-trace estimate).
    subsample_factor
        ``N / B`` when the data plate was subsampled: ``subsample_factor * total`` then estimates
        the full-data value (the estimate covers the ``B`` points of one frozen minibatch).
    """

    total: float
    total_se: float
    per_point: np.ndarray
    per_point_se: np.ndarray
    ess: np.ndarray
    num_samples: int
    point_plates: tuple[str, ...] = ()
    point_shape: tuple[int, ...] = ()
    subsample_factor: float = 1.0

    @property
    def num_points(self) -> int:
        return int(self.per_point.shape[0])

    @property
    def mean(self) -> float:
        """Average log-evidence per evaluated data point (the "test log-likelihood" of papers)."""
        return self.total / self.num_points

    @property
    def mean_se(self) -> float:
        return self.total_se / self.num_points


def log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 10_000,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> EvidenceResult:
    r"""Importance-sampled log-evidence :math:`\log p(x)` with a standard error.

    Per data point (local latents) or for the whole trace (global latents),

    .. math::

        \log \hat p(x) = \operatorname{logsumexp}_{s=1}^{S} \log w_s - \log S,
        \qquad \mathrm{se} = \frac{\mathrm{sd}(w)}{\sqrt{S}\, \overline{w}}
        = \sqrt{\frac{S}{S-1}\left(\frac{\sum_s w_s^2}{(\sum_s w_s)^2} - \frac1S\right)},

    the second by the delta method, evaluated with weights scaled by their maximum (stable in
    log space). This is the IWAE bound with :math:`K = S` [4]_, the "test log-likelihood" that
    papers report. It is a stochastic lower bound, biased down by about :math:`\mathrm{se}^2/2`,
    and the standard error is only meaningful when the weights have finite variance
    (:math:`\hat k < 0.5`, see :func:`psis_diagnostic`): with a heavy tail it is underestimated.

    Draws run in blocks of ``chunk_size`` under ``torch.no_grad`` and are combined by a streaming
    log-sum-exp, so memory stays at one block whatever ``num_samples``. The model is evaluated as
    written: site-specific ``poutine.scale`` factors temper the weights (a warning is issued); a
    scale shared by all sites and the subsampling factor are left out.

    Parameters
    ----------
    model, guide
        Pyro model and guide, called with ``*args, **kwargs``.
    num_samples
        Number ``S`` of guide draws (10,000 by default).
    chunk_size
        Particles per vectorized run.
    max_plate_nesting
        The model's plate nesting (guessed when omitted).

    Returns
    -------
    EvidenceResult

    Examples
    --------
    ::

        result = log_evidence(vae.model, vae.guide, x_test, num_samples=5000, chunk_size=500)
        print(f"test log-likelihood {result.mean:.2f} +- {result.mean_se:.2f} nats per point")
    """
    check_counts(num_samples, chunk_size, minimum=2)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting)
    accumulator = LogMeanExp()
    plates: tuple[PointPlate, ...] = ()
    subsample_factor = 1.0
    for weights in particle_blocks(setup, num_samples, chunk_size):
        accumulator.update(weights.log_weights.detach().cpu().double().numpy())
        plates = weights.point_plates
        subsample_factor = _subsample_factor(weights)
    value, se, ess = accumulator.result()
    names, shape = _plate_names(plates)
    return EvidenceResult(
        total=float(value.sum()),
        total_se=float(np.sqrt(np.square(se).sum())),
        per_point=value,
        per_point_se=se,
        ess=ess,
        num_samples=num_samples,
        point_plates=names,
        point_shape=shape,
        subsample_factor=subsample_factor,
    )


def _subsample_factor(weights: ParticleWeights) -> float:
    """The point plates' ``N / B``: ``ParticleWeights.scale`` without the user's common scale."""
    user_scale = common_user_scale((weights.model_trace, weights.guide_trace))
    return weights.scale / (user_scale if user_scale is not None and user_scale != 0 else 1.0)


# -- importance resampling -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResampledPosterior:
    r"""Posterior draws resampled from the guide's draws by their importance weights.

    Attributes
    ----------
    samples
        Site name to ``[num_draws, ...]`` tensors, one per latent (and ``pyro.deterministic``) site
        of the model, with Pyro's broadcasting singleton dims removed (a global ``[D]`` latent is
        ``[num_draws, D]``, a local latent in a plate of size ``N`` is ``[num_draws, N, ...]``).
    dims
        Site name to the names of its dims after the draw dim (plates by name, others
        ``"{site}_dim_{k}"``), as in the ArviZ export.
    psis
        PSIS diagnostic of the proposal draws: ``psis.khat`` tells whether the resampled posterior
        can be trusted (below about 0.7) and ``psis.ess`` how many distinct draws it effectively
        holds.
    num_proposals
        Number ``S`` of guide draws resampled from.
    smoothed
        Whether Pareto-smoothed weights were used.
    """

    samples: dict[str, torch.Tensor]
    dims: dict[str, tuple[str, ...]]
    psis: PSISResult
    num_proposals: int
    smoothed: bool

    @property
    def num_draws(self) -> int:
        return int(next(iter(self.samples.values())).shape[0]) if self.samples else 0


def importance_resample(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    num_proposals: int | None = None,
    smooth: bool = False,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> ResampledPosterior:
    r"""Sampling-importance-resampling (SIR) from the guide: the implied IW posterior [3]_.

    Draws ``num_proposals`` latents :math:`z_{1..S} \sim q`, then ``num_samples`` indices
    :math:`j \sim \mathrm{Categorical}(\tilde w)` with :math:`\tilde w_s \propto p(x, z_s) / q(z_s
    \mid x)` (multinomial, with replacement) and returns :math:`z_j`. For :math:`S \to \infty`
    the draws follow the exact posterior; for finite ``S`` they follow the importance-weighted
    posterior :math:`q_{IW}`, whose marginal likelihood bound is the IWAE bound with
    :math:`K = S` (Domke & Sheldon 2018), so it is closer to the posterior than ``q``. With local
    latents each data point is resampled independently (the weights factorize over points); with
    global latents whole draws are resampled. ``smooth=True`` resamples with Pareto-smoothed
    weights [2]_, which trades a little bias for less variance under heavy tails.

    Parameters
    ----------
    model, guide
        Pyro model and guide, called with ``*args, **kwargs``.
    num_samples
        Number of resampled draws returned.
    num_proposals
        Number ``S`` of guide draws to resample from (default ``4 * num_samples``).
    smooth
        Resample with PSIS-smoothed instead of raw weights.
    chunk_size, max_plate_nesting
        As in :func:`log_evidence`.

    Returns
    -------
    ResampledPosterior

    Examples
    --------
    ::

        post = importance_resample(model, guide, X, y, num_samples=2000)
        w_mean = post.samples["w"].mean(0)
        print(post.psis.max_khat)   # trust the draws when this is below about 0.7

    For an ArviZ object with these draws use ``to_inference_data(..., resample=True)``.
    """
    resampled = resampled_draws(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        num_proposals=num_proposals,
        smooth=smooth,
        chunk_size=chunk_size,
        max_plate_nesting=max_plate_nesting,
    )
    draws, arrays, psis = resampled.draws, resampled.arrays, resampled.psis
    samples, dims = {}, {}
    for group in (draws.latents, draws.deterministic):
        for name, site in group.items():
            squeezed = site.squeezed(draws.nesting, arrays[name])
            samples[name] = torch.as_tensor(squeezed, device=site.device)
            dims[name] = tuple(site.layout(draws.nesting)[1])
    return ResampledPosterior(
        samples=samples,
        dims=dims,
        psis=psis,
        num_proposals=resampled.num_proposals,
        smoothed=smooth,
    )


@dataclass
class _Resampled:
    setup: object
    draws: object
    arrays: dict[str, np.ndarray]  # resampled padded arrays: latents, deterministic, log-lik
    log_p: np.ndarray
    log_q: np.ndarray
    psis: PSISResult
    num_proposals: int


def resampled_draws(
    model,
    guide,
    args,
    kwargs,
    *,
    num_samples: int,
    num_proposals: int | None,
    smooth: bool,
    chunk_size: int,
    max_plate_nesting: int | None,
) -> _Resampled:
    """Shared by :func:`importance_resample` and the ArviZ export with ``resample=True``."""
    num_proposals = 4 * num_samples if num_proposals is None else num_proposals
    check_counts(num_samples, chunk_size)
    check_counts(num_proposals, chunk_size, minimum=2)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting)
    draws = collect_draws(setup, num_proposals, chunk_size)
    names, shape = _plate_names(draws.point_plates)
    psis = psis_from_log_weights(draws.log_weights, point_plates=names, point_shape=shape)
    smoothed = None
    if smooth:
        smoothed, _ = _arviz_compat.psislw(draws.log_weights.T)
        smoothed = smoothed.T
    index = resample_indices(draws.log_weights, num_samples, smoothed)
    arrays = {}
    for group in (draws.latents, draws.deterministic, draws.log_likelihood):
        for name, site in group.items():
            arrays[name] = gather(site.array, index, draws.point_plates, draws.nesting)
    return _Resampled(
        setup=setup,
        draws=draws,
        arrays=arrays,
        log_p=np.take_along_axis(draws.log_p, index, axis=0),
        log_q=np.take_along_axis(draws.log_q, index, axis=0),
        psis=psis,
        num_proposals=num_proposals,
    )


# -- bounds versus K -----------------------------------------------------------------------------


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

    def plot(self, ax=None):
        """Plot the curve: see :func:`pyro_vi_ext.diagnostics.plot_bound_vs_k`."""
        from pyro_vi_ext.diagnostics.plots import plot_bound_curve

        return plot_bound_curve(self, ax=ax)


def bound_curve_from_log_weights(log_weights, ks: Sequence[int]) -> BoundCurve:
    r"""IWAE_K for every ``K`` in ``ks`` from ``[S]`` or ``[S, P]`` log weights (draws first)."""
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
        block = log_weights[: count * k].reshape(count, k, num_points)
        peak = block.max(1, keepdims=True)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        per_group = (np.log(np.exp(block - peak).sum(1)) + peak[:, 0] - math.log(k)).sum(-1)
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
    **kwargs,
) -> BoundCurve:
    r"""Estimate :math:`\mathrm{IWAE}_K = \mathbb E \log \frac1K \sum_{k=1}^K w_k` over ``ks``.

    One pool of ``num_samples`` guide draws (default ``20 * max(ks)``) is split, for every ``K``,
    into disjoint groups of ``K``; the bound is the mean over groups (summed over data points) with
    its standard error. In expectation the curve is non-decreasing in ``K``, starts at the ELBO
    (``K = 1``) and tends to :math:`\log p(x)` [4]_; a flat curve near the ELBO means the guide is
    already close to the posterior, a long climb that the ELBO gap is large.

    Returns
    -------
    BoundCurve

    Examples
    --------
    ::

        curve = iw_bound_curve(model, guide, x, ks=(1, 10, 100, 1000))
        curve.plot()
    """
    if num_samples is None:
        num_samples = 20 * max(int(k) for k in ks)
    check_counts(num_samples, chunk_size)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting)
    log_p, log_q, _ = collect_log_weights(setup, num_samples, chunk_size)
    return bound_curve_from_log_weights(log_p - log_q, ks)


__all__ = [
    "BoundCurve",
    "EvidenceResult",
    "PSISResult",
    "ResampledPosterior",
    "bound_curve_from_log_weights",
    "importance_resample",
    "iw_bound_curve",
    "khat_threshold",
    "log_evidence",
    "psis_diagnostic",
    "psis_from_log_weights",
]
