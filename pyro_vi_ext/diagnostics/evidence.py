r"""Importance-sampled log-evidence :math:`\log p(x)` of a model, with the guide as proposal.

:math:`\log \frac1S \sum_s w_s` with :math:`w_s = p(x, z_s) / q(z_s \mid x)` is the IWAE bound
with :math:`K = S` [1]_, the "test log-likelihood" papers report, here with a delta-method standard
error, per data point for amortized local latents and for the whole trace otherwise.

References
----------
.. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
.. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
   Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pyro_vi_ext.diagnostics._repr import short_repr
from pyro_vi_ext.diagnostics._sampling import (
    LogMeanExp,
    ProposalCheck,
    VectorizeParticles,
    check_counts,
    particle_blocks,
    plate_names,
    prepare,
)
from pyro_vi_ext.infer._weights import ParticleWeights, PointPlate, common_user_scale


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
    proposal_problem
        ``None``, or why the guide cannot serve as a proposal (a point mass, naming the sites);
        the standard errors are then NaN and the effective sample sizes 1.
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
    proposal_problem: str | None = None

    def __repr__(self) -> str:
        return short_repr(self)

    @property
    def num_points(self) -> int:
        """Number of evaluated data points (1 for a whole-trace estimate)."""
        return int(self.per_point.shape[0])

    @property
    def mean(self) -> float:
        """Average log-evidence per evaluated data point (the "test log-likelihood" of papers)."""
        return self.total / self.num_points

    @property
    def mean_se(self) -> float:
        """Standard error of :attr:`mean`."""
        return self.total_se / self.num_points


def log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 10_000,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    **kwargs,
) -> EvidenceResult:
    r"""Importance-sampled log-evidence :math:`\log p(x)` with a standard error.

    Per data point (local latents) or for the whole trace (global latents),

    .. math::

        \log \hat p(x) = \operatorname{logsumexp}_{s=1}^{S} \log w_s - \log S,
        \qquad \mathrm{se} = \frac{\mathrm{sd}(w)}{\sqrt{S}\, \overline{w}}
        = \sqrt{\frac{S}{S-1}\left(\frac{\sum_s w_s^2}{(\sum_s w_s)^2} - \frac1S\right)},

    the second by the delta method, evaluated with weights scaled by their maximum (stable in
    log space). This is the IWAE bound with :math:`K = S` [1]_, the "test log-likelihood" that
    papers report. It is a stochastic lower bound, biased down by about :math:`\mathrm{se}^2/2`,
    and the standard error is only meaningful when the weights have finite variance
    (:math:`\hat k < 0.5`, see :func:`~pyro_vi_ext.diagnostics.psis_diagnostic`): with a heavy
    tail it is underestimated. A guide without spread (a point mass, e.g. ``AutoDelta``) gives
    no estimate of :math:`\log p(x)` at all: a warning names its sites, ``proposal_problem`` is
    set, and the standard errors are NaN and the effective sample sizes 1.

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
        Draws per block (per vectorized run).
    max_plate_nesting
        The model's plate nesting (guessed when omitted).
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
    EvidenceResult

    References
    ----------
    .. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.

    Examples
    --------
    ::

        result = log_evidence(vae.model, vae.guide, x_test, num_samples=5000, chunk_size=500)
        print(f"test log-likelihood {result.mean:.2f} +- {result.mean_se:.2f} nats per point")
    """
    check_counts(num_samples, chunk_size, minimum=2)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting, vectorize_particles)
    accumulator = LogMeanExp()
    check = ProposalCheck()
    plates: tuple[PointPlate, ...] = ()
    subsample_factor = 1.0
    for weights in particle_blocks(setup, num_samples, chunk_size, check):
        accumulator.update(weights.log_weights.detach().cpu().double().numpy())
        plates = weights.point_plates
        subsample_factor = _subsample_factor(weights)
    value, se, ess = accumulator.result()
    problem = check.problem()
    if problem is not None:
        warnings.warn(problem, UserWarning, stacklevel=2)
        se, ess = np.full_like(se, np.nan), np.ones_like(ess)
    names, shape = plate_names(plates)
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
        proposal_problem=problem,
    )


def _subsample_factor(weights: ParticleWeights) -> float:
    """Return the point plates' ``N / B``: ``ParticleWeights.scale`` without the user's scale."""
    user_scale = common_user_scale((weights.model_trace, weights.guide_trace))
    return weights.scale / (user_scale if user_scale is not None and user_scale != 0 else 1.0)


__all__ = ["EvidenceResult", "log_evidence"]
