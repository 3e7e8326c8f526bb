r"""The ELBO with its entropy or its KL term in closed form, as a Pyro loss.

Two rearrangements of the same bound replace a Monte Carlo term by its exact value [1]_ [2]_:

.. math::

    \mathrm{ELBO}(x) = \mathbb E_{q}[\log p(x, z)] + \mathbb H[q(z \mid x)]
                     = \mathbb E_{q}[\log p(x \mid z)] - \mathrm{KL}(q(z \mid x) \,\|\, p(z)).

The value is the ELBO in expectation either way; the gradient estimators differ in variance. See
:class:`ClosedFormELBO`.

References
----------
.. [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (the "SGVB with
   analytic KL" estimator, their eq. 10).
.. [2] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
   Estimators for Variational Inference", NeurIPS 2017 (why the closed-form entropy can *raise*
   the variance near the optimum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pyro.distributions as dist
import torch
from torch.distributions import constraints, kl_divergence

from pyro_vi_ext.infer._loss_base import ParticleELBO
from pyro_vi_ext.infer._weights import (
    ParticleRun,
    ParticleWeights,
    common_user_scale,
    latent_sites,
    sample_sites,
    site_log_prob,
    site_user_scale,
    trace_particles,
)

Form = Literal["entropy", "kl"]
_FORMS = ("entropy", "kl")

__all__ = ["ClosedFormELBO"]


class ClosedFormELBO(ParticleELBO):
    r"""ELBO estimator with the guide's entropy, or its KL to the prior, in closed form.

    With :math:`z_{n,1..K} \sim q(z \mid x_n)` reparameterized, per data point :math:`n`:

    * ``form="entropy"``:
      :math:`\widehat{\mathcal L}(x_n) = \frac1K \sum_k \log p(x_n, z_{n,k}) +
      \sum_{\text{sites } j} \mathbb H[q_j(\cdot \mid x_n)]`;
    * ``form="kl"``:
      :math:`\widehat{\mathcal L}(x_n) = \frac1K \sum_k \big[\sum_{\text{observed } o}
      \log p(x_{n,o} \mid z_{n,k}) - \sum_{\text{latent } j} \mathrm{KL}(q_j \,\|\,
      p_j(\cdot \mid z_{n,k,\mathrm{pa}(j)}))\big]`, the "SGVB with analytic KL" form [1]_,
      one ``torch.distributions.kl_divergence`` per latent site (a prior that depends on other
      latents is taken at their sampled values, which keeps the estimate unbiased).

    Both have expectation :math:`\mathrm{ELBO}(x_n)` (the value of ``Trace_ELBO``) and their
    gradient is the autograd gradient of the estimate, so both are unbiased for the ELBO's
    gradient. The loss is :math:`-s \sum_{n \in \text{batch}} \widehat{\mathcal L}(x_n)`, with
    :math:`s` the scale of :func:`~pyro_vi_ext.infer._weights.trace_particles`: the subsampling
    factor :math:`N / B` of the data plate times a user scale shared by every site; site-specific
    user scales (``poutine.scale``, e.g. KL annealing) multiply each site's term.

    Variance, in short: an exact term has no sampling noise, but near the exact posterior the
    Monte Carlo terms :math:`\log p(x, z)` and :math:`-\log q(z)` cancel each other's noise
    (their sum is constant at the optimum), which a closed-form term breaks; there the closed
    forms can be *noisier* than plain Monte Carlo and "sticking the landing" is the
    zero-variance estimator [2]_. Far from it (e.g. an under-dispersed guide, where
    :math:`-\log q` carries most of the noise) the closed forms win. For a reparameterized
    location-scale guide such as a Gaussian, :math:`\frac{d}{d\phi}[-\log q_\phi(z_\phi)] =
    \frac{d}{d\phi}\mathbb H[q_\phi]` draw by draw, so ``"entropy"`` has exactly the *gradient*
    of ``Trace_ELBO`` (only the value's noise differs), while ``"kl"`` also removes the noise of
    the prior term from the gradient.

    Every guide site must be reparameterized (``has_rsample``); a site whose entropy (or whose
    KL to its prior) has no closed form is refused with its name. With ``K > 1`` latents are
    vectorized over ``num_particles`` on a plate left of the model's plates (or drawn in a loop
    with ``vectorize_particles=False``). The estimate is an ELBO for any ``K``, so latents outside
    a subsampled data plate are allowed (Pyro's scales, as ``Trace_ELBO``).

    Autoguides: an ``AutoNormal`` site is a ``Delta`` over an auxiliary
    ``<site>_unconstrained`` Normal; its entropy is the auxiliary's closed-form entropy minus the
    Monte Carlo ``log_density`` the Delta carries (zero for a real-support site), and its KL is
    the auxiliary's closed-form KL when the transform is the identity (refused otherwise, as is
    ``form="kl"`` with a joint auxiliary latent such as ``AutoDiagonalNormal``'s).

    After each call :attr:`last_terms` holds ``elbo`` and the closed-form term (``entropy`` or
    ``kl``), in nats per data point.

    Parameters
    ----------
    form
        ``"entropy"`` or ``"kl"``.
    num_particles
        Draws ``K`` per data point.
    max_plate_nesting
        The model's plate nesting, without the particle plate (guessed by one run when omitted).
    vectorize_particles
        Draw the ``K > 1`` particles on one vectorized plate (True) or in a loop (False; one
        minibatch for all particles). One particle never uses a particle plate, as
        ``Trace_ELBO``.
    retain_graph
        Passed to ``backward`` in ``loss_and_grads``.
    jit : bool or {"inductor"}
        Compile model, guide and bound with ``torch.jit.trace`` once per signature (new argument
        shapes, a new model or guide, gradients on/off recompile); same values and gradients as
        the eager path on the same draws, eager fallback with a warning when tracing fails.
        ``"inductor"``: loss and gradients as one graph per signature compiled by torch inductor
        (fastest per step; seconds to compile; uncompiled graph without a C++ compiler).
        Values the model or guide reads from a global or a closure (e.g. a KL-annealing
        factor in ``poutine.scale``) are frozen at the first call: pass them as arguments.
        See :mod:`pyro_vi_ext.infer._compiled`.

    References
    ----------
    .. [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (the "SGVB with
       analytic KL" estimator, their eq. 10).
    .. [2] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
       Estimators for Variational Inference", NeurIPS 2017 (why the closed-form entropy can *raise*
       the variance near the optimum).

    Examples
    --------
    ::

        from pyro.infer import SVI
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                  loss=ClosedFormELBO(form="kl"))
        svi.step(x_batch, idx=idx, n_data=len(x_train))
    """

    supports_sequential_particles = True

    def __init__(
        self,
        form: Form = "kl",
        num_particles: int = 1,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        jit: bool | str = False,
    ):
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            jit=jit,
        )
        self.form: Form = form

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """Return the negative ELBO estimate; its gradient is the estimator's gradient."""
        nesting = self._model_plate_nesting(model, guide, args, kwargs)
        weights = trace_particles(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            plate_nesting=nesting,
            vectorize=self.vectorize_particles and self.num_particles > 1,
            # the estimate only averages log-densities over particles: an ELBO for any K
            linear_in_log_weights=True,
        )
        for name, site in latent_sites(weights.guide_trace):
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"Guide site '{name}' ({type(site['fn']).__name__}) has no rsample; "
                    f"ClosedFormELBO(form={self.form!r}) differentiates through reparameterized "
                    "samples. Use Trace_ELBO (score-function gradient) for this guide, or a "
                    "reparameterizable distribution."
                )
        per_site_scale = (
            weights.whole_trace_scaled
            or common_user_scale((weights.model_trace, weights.guide_trace)) is None
        )
        if self.form == "entropy":
            closed = _closed_form_terms(weights, per_site_scale, _entropy)
            monte_carlo = weights.log_p  # [S, P], user scales handled by trace_particles
            per_point = monte_carlo.mean(0) + closed
        else:
            closed = _closed_form_terms(weights, per_site_scale, _kl_to_prior)  # [P]
            monte_carlo = _observed_log_likelihood(weights, per_site_scale)
            per_point = monte_carlo.mean(0) - closed
        elbo = weights.scale * per_point.sum()
        with torch.no_grad():
            per_datum = weights.scale / weights.points_represented
            self._set_terms(
                {"elbo": elbo / weights.points_represented, self.form: closed.sum() * per_datum}
            )
        return -elbo


def _entropy(name: str, site: dict, run: ParticleRun) -> torch.Tensor:
    if isinstance(site["fn"], dist.Delta):
        # An autoguide's Delta pushes an auxiliary latent through a bijection; its log_density
        # is log|det d(aux)/d(site)|, so H[site] = H[aux] - E[log_density]: Monte Carlo here,
        # zero for the identity transform of a real-support site.
        return -site["fn"].log_prob(site["value"])
    try:
        return site["fn"].entropy()
    except NotImplementedError:
        raise ValueError(
            f"Guide site '{name}' ({type(site['fn']).__name__}) has no closed-form entropy in "
            "torch.distributions; use ClosedFormELBO(form='kl') if its KL to the prior is known, "
            "or Trace_ELBO."
        ) from None


def _is_real_support(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _kl_guide_distribution(name: str, site: dict, run: ParticleRun):
    """Return the distribution of a user's guide site, seen through an autoguide's Delta."""
    if not isinstance(site["fn"], dist.Delta):
        return site["fn"]
    prior = run.model_trace.nodes[name]["fn"]
    auxiliary = run.guide_trace.nodes.get(f"{name}_unconstrained")
    if (
        auxiliary is None
        or auxiliary["type"] != "sample"
        or not auxiliary["infer"].get("is_auxiliary")
        or auxiliary["value"].shape != site["value"].shape
    ):
        raise ValueError(
            f"Guide site '{name}' is a Delta whose distribution comes from a joint auxiliary "
            "latent (e.g. AutoDiagonalNormal, AutoMultivariateNormal) or has no density "
            "(AutoDelta): its KL to the prior has no closed form. Use "
            "ClosedFormELBO(form='entropy'), an AutoNormal guide, or Trace_ELBO."
        )
    if not _is_real_support(prior.support):
        raise ValueError(
            f"Guide site '{name}' is an autoguide Delta over '{name}_unconstrained' through a "
            f"non-identity transform (prior support {prior.support}); the KL of the transformed "
            "distribution to the prior has no closed form. Use ClosedFormELBO(form='entropy') "
            "or Trace_ELBO."
        )
    return auxiliary["fn"]  # identity transform: the site has the auxiliary's distribution


def _kl_to_prior(name: str, site: dict, run: ParticleRun) -> torch.Tensor:
    prior = run.model_trace.nodes[name]["fn"]
    try:
        return kl_divergence(_kl_guide_distribution(name, site, run), prior)
    except NotImplementedError:
        raise ValueError(
            f"Latent site '{name}': no closed-form KL(q || p) is registered for guide "
            f"{type(site['fn']).__name__} and prior {type(prior).__name__} (torch.distributions."
            "kl_divergence). Use ClosedFormELBO(form='entropy'), register the pair with "
            "torch.distributions.kl.register_kl, or use Trace_ELBO."
        ) from None


def _masked(term: torch.Tensor, site: dict) -> torch.Tensor:
    mask = site["mask"]
    if mask is None or mask is True:
        return term
    if mask is False:
        return torch.zeros_like(term)
    return term.masked_fill(~mask, 0.0)


def _scaled(term: torch.Tensor, site: dict, weights: ParticleWeights, per_site_scale: bool):
    if not per_site_scale:
        return term
    if weights.whole_trace_scaled:
        return term * site["scale"]  # Pyro's full scale: subsampling factors and user scale
    scale = site_user_scale(site)
    if scale is None:
        raise ValueError(
            "ClosedFormELBO supports a user scale per site (poutine.scale with a number), not a "
            "tensor of scales; use Trace_ELBO for element-wise scales."
        )
    return term * scale


def _to_points(term: torch.Tensor, weights: ParticleWeights) -> torch.Tensor:
    """Sum a site's batch-shaped term over every dim except particles and point plates: [S, P]."""
    nesting = -weights.particle_dim
    while term.dim() < nesting:
        term = term.unsqueeze(0)
    keep = {0} | {nesting + plate.dim for plate in weights.point_plates}
    summed = [d for d in range(nesting) if d not in keep and term.shape[d] != 1]
    if summed:
        term = term.sum(summed, keepdim=True)
    rows = weights.num_particles if weights.vectorized else 1  # particles of one run
    kept_shape = [term.shape[0]] + [term.shape[nesting + p.dim] for p in weights.point_plates]
    target = [rows] + [plate.size for plate in weights.point_plates]
    return term.reshape(kept_shape).expand(target).reshape(rows, -1)


def _closed_form_terms(
    weights: ParticleWeights,
    per_site_scale: bool,
    closed_form: Callable[[str, dict, ParticleRun], torch.Tensor],
) -> torch.Tensor:
    """``[P]`` sum over guide sites of a closed-form term, averaged over particles (and runs)."""
    total = torch.zeros(weights.num_points, dtype=weights.log_p.dtype, device=weights.log_p.device)
    for run in weights.runs:
        for name, site in latent_sites(run.guide_trace):
            if closed_form is _kl_to_prior and site["infer"].get("is_auxiliary"):
                continue  # not a model latent: its KL is counted at the user site it stands for
            term = _masked(closed_form(name, site, run), site)
            term = _scaled(term, site, weights, per_site_scale)
            total = total + _to_points(term, weights).mean(0) / len(weights.runs)
    return total


def _observed_log_likelihood(weights: ParticleWeights, per_site_scale: bool) -> torch.Tensor:
    """``[S, P]`` sum of the observed sites' log-likelihoods."""
    rows = []
    for run in weights.runs:
        total = torch.zeros_like(weights.log_p[: weights.log_p.shape[0] // len(weights.runs)])
        for _, site in sample_sites(run.model_trace):
            if site["is_observed"]:
                term = _scaled(site_log_prob(site), site, weights, per_site_scale)
                total = total + _to_points(term, weights)
        rows.append(total)
    return torch.cat(rows, 0)
