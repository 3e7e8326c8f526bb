r"""Sampling-importance-resampling from the guide: the importance-weighted posterior.

Resampling guide draws :math:`z_{1..S} \sim q` in proportion to :math:`w_s = p(x, z_s) / q(z_s
\mid x)` gives draws from the importance-weighted posterior of Domke & Sheldon [1]_, closer to
the posterior than ``q``; Pareto smoothing [2]_ of the weights is optional.

References
----------
.. [1] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
.. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
   Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pyro_vi_ext.diagnostics import _arviz_compat
from pyro_vi_ext.diagnostics._repr import short_repr
from pyro_vi_ext.diagnostics._sampling import (
    Draws,
    ProposalCheck,
    Setup,
    VectorizeParticles,
    check_counts,
    collect_draws,
    gather,
    plate_names,
    prepare,
    resample_indices,
)
from pyro_vi_ext.diagnostics.psis import PSISResult, flag_point_mass, psis_from_log_weights


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
        holds; ``psis.proposal_problem`` names the sites of a guide without spread.
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

    def __repr__(self) -> str:
        return short_repr(self)

    @property
    def num_draws(self) -> int:
        """Number of resampled draws."""
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
    vectorize_particles: VectorizeParticles = "auto",
    **kwargs,
) -> ResampledPosterior:
    r"""Sampling-importance-resampling (SIR) from the guide: the implied IW posterior [1]_.

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
    chunk_size, max_plate_nesting, vectorize_particles
        As in :func:`log_evidence`.

    Returns
    -------
    ResampledPosterior

    References
    ----------
    .. [1] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
    .. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
       Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).

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
        vectorize_particles=vectorize_particles,
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
class ResampledDraws:
    """The proposal draws and their resampled padded arrays, for the export and the results.

    Attributes
    ----------
    setup, draws
        The prepared model and guide and the proposal draws.
    arrays
        Resampled padded arrays of latents, deterministic sites and log-likelihoods by site.
    log_p, log_q
        ``[num_samples, P]`` log-densities of the resampled draws.
    psis
        PSIS diagnostic of the proposal draws.
    num_proposals
        Number ``S`` of proposal draws.
    """

    setup: Setup
    draws: Draws
    arrays: dict[str, np.ndarray]
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
    vectorize_particles: VectorizeParticles = True,
) -> ResampledDraws:
    """Draw proposals and resample them (for :func:`importance_resample` and the ArviZ export).

    Raises
    ------
    ValueError
        For an empty batch, or NaN log-weights (naming the sites whose log-density is NaN).

    Warns
    -----
    UserWarning
        When the guide has no spread (a point mass); ``psis`` is then marked.
    """
    num_proposals = 4 * num_samples if num_proposals is None else num_proposals
    check_counts(num_samples, chunk_size)
    check_counts(num_proposals, chunk_size, minimum=2)
    setup = prepare(model, guide, args, kwargs, max_plate_nesting, vectorize_particles)
    check = ProposalCheck()
    draws = collect_draws(setup, num_proposals, chunk_size, check)
    names, shape = plate_names(draws.point_plates)
    psis = psis_from_log_weights(draws.log_weights, point_plates=names, point_shape=shape)
    psis = flag_point_mass(psis, check.problem())
    smoothed = None
    if smooth:
        smoothed, _ = _arviz_compat.psislw(draws.log_weights.T)
        smoothed = smoothed.T
    index = resample_indices(draws.log_weights, num_samples, smoothed)
    arrays = {}
    for group in (draws.latents, draws.deterministic, draws.log_likelihood):
        for name, site in group.items():
            arrays[name] = gather(site.array, index, draws.point_plates, draws.nesting)
    return ResampledDraws(
        setup=setup,
        draws=draws,
        arrays=arrays,
        log_p=np.take_along_axis(draws.log_p, index, axis=0),
        log_q=np.take_along_axis(draws.log_q, index, axis=0),
        psis=psis,
        num_proposals=num_proposals,
    )


__all__ = ["ResampledDraws", "ResampledPosterior", "importance_resample", "resampled_draws"]
