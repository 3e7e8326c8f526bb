"""Eight schools (Rubin, 1981; Gelman et al., BDA 5.5), centered and non-centered.

The effect of a coaching programme measured in ``J = 8`` schools, with known standard errors:

.. code-block:: text

    mu ~ Normal(0, 5)                                   site "mu", global
    tau ~ HalfCauchy(5)                                 site "tau", global
    centered:     theta_j ~ Normal(mu, tau)             site "theta", plate "school"
    non-centered: theta_tilde_j ~ Normal(0, 1)          site "theta_tilde", plate "school"
                  theta_j = mu + tau * theta_tilde_j    pyro.deterministic "theta"
    y_j ~ Normal(theta_j, sigma_j)                      site "y", plate "school"

Both parameterizations define the same distribution of ``(mu, tau, theta, y)``; they differ in the
geometry a guide sees. In the centered one the posterior of ``(log tau, theta)`` is a funnel: as
``tau`` shrinks the ``theta_j`` are pinned to ``mu``, which a mean-field Normal guide cannot
follow: it tends to underestimate ``tau``, and its importance weights can be heavy-tailed (large
PSIS k-hat, Yao et al. 2018). The non-centered one removes most of that dependence.

Data: :data:`EIGHT_SCHOOLS_Y` and :data:`EIGHT_SCHOOLS_SIGMA`; :func:`eight_schools_data` returns
them as tensors ``(sigma, y)``, in the order of the models' arguments ``model(sigma, y=None, *,
idx=None, n_data=None)`` (``sigma`` plays the role of the inputs ``x`` in the runner's convention,
so ``fit(model, guide, (sigma, y))`` works).

Guides: :func:`build_eight_schools` returns ``(model, guide)`` with a Pyro autoguide:
``guide="mean_field"`` is :class:`pyro.infer.autoguide.AutoNormal` (independent Normals in the
unconstrained space, so ``tau`` is log-normal) and ``guide="full_rank"``
:class:`FullDataAutoMultivariateNormal` (an ``AutoMultivariateNormal``). The mean-field guide gets
:func:`school_plate` as ``create_plates``, so under subsampling it draws the ``theta`` of exactly
the schools in ``idx`` (without it AutoNormal would subsample schools of its own choosing); the
full-rank guide couples all schools, needs the full data and raises on a subset.

``mu`` and ``tau`` are global, so an importance-weighted bound must be fitted on the full data
(``ImportanceWeightedELBO`` raises when the "school" plate is subsampled); ``Trace_ELBO`` works
with subsampling too.

Example::

    import pyro
    from pyro_vi_ext import ImportanceWeightedELBO
    from pyro_vi_ext.training import fit
    from models.eight_schools import build_eight_schools, eight_schools_data

    sigma, y = eight_schools_data()
    model, guide = build_eight_schools(parameterization="noncentered")
    fit(model, guide, (sigma, y), ImportanceWeightedELBO(num_particles=10, estimator="dreg"),
        pyro.optim.Adam({"lr": 0.02}), num_steps=2000)     # full data: batch_size=None
    print(guide.median(sigma, y)["tau"])

References
----------
.. [1] D. B. Rubin, "Estimation in Parallel Randomized Experiments", Journal of Educational
   Statistics 6(4), 1981.
.. [2] A. Gelman et al., Bayesian Data Analysis, 3rd ed., section 5.5.
.. [3] M. Betancourt, M. Girolami, "Hamiltonian Monte Carlo for Hierarchical Models", 2013.
.. [4] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
   Inference", ICML 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide, AutoMultivariateNormal, AutoNormal

from models._common import check_positive, data_plate

Parameterization = Literal["centered", "noncentered"]
GuideFamily = Literal["mean_field", "full_rank"]

__all__ = [
    "EIGHT_SCHOOLS_SIGMA",
    "EIGHT_SCHOOLS_Y",
    "FullDataAutoMultivariateNormal",
    "NUM_SCHOOLS",
    "build_eight_schools",
    "eight_schools_centered",
    "eight_schools_data",
    "eight_schools_noncentered",
    "school_plate",
]

EIGHT_SCHOOLS_Y: tuple[float, ...] = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
"""Estimated coaching effects of schools A to H."""

EIGHT_SCHOOLS_SIGMA: tuple[float, ...] = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)
"""Standard errors of the effects."""

NUM_SCHOOLS = 8

MU_PRIOR_SCALE = 5.0
TAU_PRIOR_SCALE = 5.0


def eight_schools_data(dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh tensors ``(sigma, y)``, each ``[8]`` (default dtype unless ``dtype`` is given)."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    sigma = torch.tensor(EIGHT_SCHOOLS_SIGMA, dtype=dtype)
    return sigma, torch.tensor(EIGHT_SCHOOLS_Y, dtype=dtype)


def school_plate(
    sigma: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
) -> pyro.plate:
    """The ``"school"`` plate of a (sub)set of schools, with the models' signature.

    Pass it to an autoguide as ``create_plates`` so that guide and model agree on the schools.
    """
    return data_plate(sigma.shape[0], idx, n_data, name="school")


def _globals(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zero = sigma.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, MU_PRIOR_SCALE))
    tau = pyro.sample("tau", dist.HalfCauchy(zero + TAU_PRIOR_SCALE))
    return mu, tau


def eight_schools_centered(
    sigma: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
) -> torch.Tensor:
    """Centered model: ``theta_j ~ N(mu, tau)``, ``y_j ~ N(theta_j, sigma_j)``; returns ``y``.

    ``y=None`` samples the effects (prior predictive).
    """
    mu, tau = _globals(sigma)
    with school_plate(sigma, y, idx=idx, n_data=n_data):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(
    sigma: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
) -> torch.Tensor:
    """Non-centered model: ``theta_tilde_j ~ N(0, 1)``, ``theta = mu + tau * theta_tilde``
    (recorded as ``pyro.deterministic("theta")``), ``y_j ~ N(theta_j, sigma_j)``; returns ``y``.
    """
    mu, tau = _globals(sigma)
    with school_plate(sigma, y, idx=idx, n_data=n_data):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(sigma.new_zeros(()), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)


class FullDataAutoMultivariateNormal(AutoMultivariateNormal):
    """:class:`~pyro.infer.autoguide.AutoMultivariateNormal` that refuses a subset of schools.

    A full-rank guide is one Gaussian over ``mu``, ``tau`` and every school's ``theta``; called
    on a subset it would silently build (or reuse) a joint over the wrong schools. It accepts the
    full data: ``idx=None``, or ``idx`` equal to ``arange(n_data)`` (the runner's full batch).
    """

    def forward(
        self,
        sigma: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        idx: torch.Tensor | None = None,
        n_data: int | None = None,
    ) -> dict[str, torch.Tensor]:
        batch = sigma.shape[0]
        full = n_data is None or int(n_data) == batch
        if idx is not None:
            full = full and torch.equal(
                torch.as_tensor(idx).cpu().long(), torch.arange(batch, dtype=torch.long)
            )
        if not full:
            raise ValueError(
                "the full-rank eight-schools guide couples all schools and needs the full data "
                "in order (no subsampling); use guide='mean_field' for minibatches of schools"
            )
        return super().forward(sigma, y, idx=idx, n_data=n_data)


def build_eight_schools(
    parameterization: Parameterization = "centered",
    guide: GuideFamily = "mean_field",
    init_scale: float = 0.1,
) -> tuple[Callable, AutoGuide]:
    """``(model, guide)`` for eight schools.

    :param parameterization: ``"centered"`` or ``"noncentered"``.
    :param guide: ``"mean_field"`` (:class:`~pyro.infer.autoguide.AutoNormal`, subsampling
        supported) or ``"full_rank"`` (:class:`FullDataAutoMultivariateNormal`, an
        ``AutoMultivariateNormal`` that raises on a subset of schools).
    :param init_scale: initial scale of the guide in the unconstrained space.
    """
    check_positive(init_scale=init_scale)
    if parameterization == "centered":
        model = eight_schools_centered
    elif parameterization == "noncentered":
        model = eight_schools_noncentered
    else:
        raise ValueError(
            f"parameterization must be 'centered' or 'noncentered', got {parameterization!r}"
        )
    if guide == "mean_field":
        return model, AutoNormal(model, init_scale=init_scale, create_plates=school_plate)
    if guide == "full_rank":
        return model, FullDataAutoMultivariateNormal(model, init_scale=init_scale)
    raise ValueError(f"guide must be 'mean_field' or 'full_rank', got {guide!r}")
