"""Bayesian linear regression with a conjugate Gaussian prior and exact answers.

.. code-block:: text

    w ~ Normal(0, prior_scale^2 I_d)                    site "w", global (outside the plate)
    y_n | w ~ Normal(x_n . w, noise_scale^2)            site "y", in plate "data"

The noise scale is known, so the posterior and the evidence are Gaussian and closed-form
(:func:`exact_posterior`, :func:`exact_log_evidence`):

.. code-block:: text

    Lambda = X^T X / sigma^2 + I / s^2      (posterior precision, sigma = noise, s = prior scale)
    w | y ~ Normal(Lambda^-1 X^T y / sigma^2, Lambda^-1)
    y ~ Normal(0, sigma^2 I_n + s^2 X X^T)

An intercept is one more weight with the same prior: give ``x`` a column of ones
(``make_regression_data(..., intercept=True)`` appends it).

Guides (all with the model's signature ``guide(x, y=None, *, idx=None, n_data=None)``):

* :func:`linear_regression_guide`: mean-field Normal, params ``linear_w_loc`` and
  ``linear_w_scale``; its optimum is known too (:func:`mean_field_optimum`: the exact mean and the
  scales ``1 / sqrt(diag Lambda)``, smaller than the exact marginal scales);
* :func:`make_exact_guide`: the exact posterior as a ``MultivariateNormal`` (no parameters): with
  it, every importance weight equals ``p(y)`` and every bound is tight;
* :func:`make_underdispersed_guide`: the exact mean with the covariance shrunk by a factor, a
  guide with known defects for diagnostics (:func:`make_scaled_posterior_guide` for any factor).

Subsampling: ``w`` is global, so under the runner's minibatches the model scales the minibatch
log-likelihood by ``N / B`` (an unbiased ELBO for ``Trace_ELBO``), but an importance-weighted bound
has no unbiased minibatch estimate here: fit :class:`pyro_vi_ext.ImportanceWeightedELBO` on the
full data (it raises for a subsampled plate).

Example::

    import pyro
    from pyro.infer import Trace_ELBO
    from pyro_vi_ext.training import fit
    from models.linear_regression import (
        build_linear_regression, exact_posterior, make_regression_data)

    x, y, w_true = make_regression_data(n=500, d=3, seed=0)
    model, guide = build_linear_regression(noise_scale=1.0, prior_scale=1.0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997})   # decaying step size
    fit(model, guide, (x, y), Trace_ELBO(), optim, num_steps=1000, batch_size=50)
    mean, cov = exact_posterior(x, y, noise_scale=1.0, prior_scale=1.0)
    print(pyro.param("linear_w_loc"), mean)   # within about one posterior sd (0.05)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch

from models._common import (
    check_positive,
    data_plate,
    sample_mean_field_weights,
    sample_weight_prior,
    standard_features,
)

__all__ = [
    "FixedGaussianGuide",
    "RegressionData",
    "build_linear_regression",
    "exact_log_evidence",
    "exact_posterior",
    "linear_regression_guide",
    "linear_regression_model",
    "make_exact_guide",
    "make_regression_data",
    "make_scaled_posterior_guide",
    "make_underdispersed_guide",
    "mean_field_optimum",
]


class RegressionData(NamedTuple):
    """A procedural regression data set: inputs ``x [n, d]``, targets ``y [n]``, weights ``w [d]``.

    ``w`` is the weight vector the targets were drawn with (ground truth).
    """

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor


def make_regression_data(
    n: int = 100,
    d: int = 3,
    seed: int = 0,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
    intercept: bool = False,
    dtype: torch.dtype | None = None,
) -> RegressionData:
    """Draw a data set from the model itself: ``w`` from the prior, ``x`` standard normal.

    :param n: number of rows.
    :param d: number of features (``d + 1`` columns with ``intercept``).
    :param seed: seed of a private generator (the global RNG is left alone).
    :param noise_scale: standard deviation of the noise on ``y``.
    :param prior_scale: standard deviation of the prior on each weight.
    :param intercept: append a column of ones to ``x`` (its weight is the intercept).
    :param dtype: dtype of the tensors (default: torch's default dtype).
    """
    check_positive(noise_scale=noise_scale, prior_scale=prior_scale)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    generator = torch.Generator().manual_seed(int(seed))
    x = standard_features(n, d, generator, intercept, torch.float64)
    w = prior_scale * torch.randn(x.shape[1], generator=generator, dtype=torch.float64)
    y = x @ w + noise_scale * torch.randn(n, generator=generator, dtype=torch.float64)
    return RegressionData(x.to(dtype), y.to(dtype), w.to(dtype))


def linear_regression_model(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
) -> torch.Tensor:
    """``w ~ N(0, prior_scale^2 I)`` (global), ``y_n ~ N(x_n . w, noise_scale^2)`` in the plate.

    ``y=None`` samples the targets (prior predictive). Returns the sampled or observed ``y``.
    """
    w = sample_weight_prior(x, prior_scale)
    with data_plate(x.shape[0], idx, n_data):
        mean = (x * w).sum(-1)  # w may carry particle dims [..., 1, d]
        return pyro.sample("y", dist.Normal(mean, noise_scale), obs=y)


def linear_regression_guide(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
    init_scale: float = 0.1,
) -> torch.Tensor:
    """Mean-field Normal guide ``w ~ N(linear_w_loc, diag(linear_w_scale)^2)``.

    The params start at ``loc = 0`` and ``scale = init_scale``.
    """
    return sample_mean_field_weights(x, "linear", init_scale)


def _posterior_precision(x: torch.Tensor, noise_scale: float, prior_scale: float) -> torch.Tensor:
    x64 = x.to(torch.float64)
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return x64.T @ x64 / noise_scale**2 + eye / prior_scale**2


def exact_posterior(
    x: torch.Tensor,
    y: torch.Tensor,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and covariance ``[d, d]`` of ``p(w | x, y)``, computed in float64.

    ``Lambda = X^T X / sigma^2 + I / s^2``, covariance ``Lambda^-1``, mean
    ``Lambda^-1 X^T y / sigma^2``. Returned in ``x``'s dtype.
    """
    check_positive(noise_scale=noise_scale, prior_scale=prior_scale)
    precision = _posterior_precision(x, noise_scale, prior_scale)
    chol = torch.linalg.cholesky(precision)
    covariance = torch.cholesky_inverse(chol)
    rhs = x.to(torch.float64).T @ y.to(torch.float64) / noise_scale**2
    mean = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    covariance = 0.5 * (covariance + covariance.T)
    return mean.to(x.dtype), covariance.to(x.dtype)


def exact_log_evidence(
    x: torch.Tensor,
    y: torch.Tensor,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
) -> float:
    """``log p(y | x)`` with ``y ~ N(0, sigma^2 I_n + s^2 X X^T)``, computed in float64.

    Evaluated in ``d`` dimensions (matrix determinant lemma and Woodbury identity), so large ``n``
    is cheap: with ``Lambda`` the posterior precision and ``m`` the posterior mean,

    ``log p(y) = -n/2 log(2 pi sigma^2) - d log s - 1/2 log det Lambda
    - 1/2 (|y|^2 / sigma^2 - m^T Lambda m)``.
    """
    check_positive(noise_scale=noise_scale, prior_scale=prior_scale)
    n, d = x.shape
    y64 = y.to(torch.float64)
    precision = _posterior_precision(x, noise_scale, prior_scale)
    chol = torch.linalg.cholesky(precision)
    rhs = x.to(torch.float64).T @ y64 / noise_scale**2
    mean = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    log_det_precision = 2.0 * torch.log(torch.diagonal(chol)).sum()
    quadratic = (y64 @ y64) / noise_scale**2 - mean @ precision @ mean
    value = (
        -0.5 * n * math.log(2.0 * math.pi * noise_scale**2)
        - d * math.log(prior_scale)
        - 0.5 * log_det_precision
        - 0.5 * quadratic
    )
    return float(value)


def mean_field_optimum(
    x: torch.Tensor,
    y: torch.Tensor,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loc and scale ``[d]`` of the best mean-field Normal guide (minimum ``KL(q || p)``).

    For a Gaussian posterior ``N(m, Lambda^-1)`` the optimum is ``N(m, diag(1 / Lambda_ii))``:
    the exact mean, with marginal scales ``1 / sqrt(Lambda_ii)`` no larger than the exact ones.
    """
    mean, _ = exact_posterior(x, y, noise_scale, prior_scale)
    precision = _posterior_precision(x, noise_scale, prior_scale)
    return mean, torch.diagonal(precision).rsqrt().to(x.dtype)


class FixedGaussianGuide:
    """A guide with no parameters: ``w ~ MultivariateNormal(mean, covariance)``.

    Callable with the model's signature; the inputs only fix dtype and device.

    :param mean: ``[d]`` mean.
    :param covariance: ``[d, d]`` positive-definite covariance.
    :param site: name of the sample site (``"w"``).
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, site: str = "w"):
        if mean.dim() != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"mean must be [d] and covariance [d, d], got {tuple(mean.shape)} and "
                f"{tuple(covariance.shape)}"
            )
        self.mean = mean
        self.covariance = covariance
        self.site = site
        self._scale_tril = torch.linalg.cholesky(covariance.to(torch.float64))

    def distribution(self, like: torch.Tensor | None = None) -> dist.MultivariateNormal:
        """The guide's distribution, in the dtype and device of ``like`` when given."""
        options = {} if like is None else {"dtype": like.dtype, "device": like.device}
        mean = self.mean.to(**options) if options else self.mean
        scale_tril = self._scale_tril.to(**options) if options else self._scale_tril.to(mean)
        return dist.MultivariateNormal(mean, scale_tril=scale_tril)

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        idx: torch.Tensor | None = None,
        n_data: int | None = None,
    ) -> torch.Tensor:
        return pyro.sample(self.site, self.distribution(x))

    def __repr__(self) -> str:
        return f"FixedGaussianGuide(site={self.site!r}, d={self.mean.shape[0]})"


def make_scaled_posterior_guide(
    x: torch.Tensor,
    y: torch.Tensor,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
    *,
    covariance_factor: float,
) -> FixedGaussianGuide:
    """The exact posterior mean with the exact covariance times ``covariance_factor`` (> 0).

    A factor below 1 gives an under-dispersed guide (importance weights with heavy tails, large
    PSIS k-hat), above 1 an over-dispersed one, 1 the exact posterior.
    """
    check_positive(covariance_factor=covariance_factor)
    mean, covariance = exact_posterior(x, y, noise_scale, prior_scale)
    return FixedGaussianGuide(mean, covariance_factor * covariance)


def make_exact_guide(
    x: torch.Tensor,
    y: torch.Tensor,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
) -> FixedGaussianGuide:
    """The exact posterior ``p(w | x, y)`` as a guide (``MultivariateNormal``, no parameters).

    With it ``log p(x, y, w) - log q(w) = log p(y | x)`` for every draw: each ELBO and
    importance-weighted bound equals :func:`exact_log_evidence` up to rounding.
    """
    return make_scaled_posterior_guide(x, y, noise_scale, prior_scale, covariance_factor=1.0)


def make_underdispersed_guide(
    x: torch.Tensor,
    y: torch.Tensor,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
    factor: float = 0.25,
) -> FixedGaussianGuide:
    """A deliberately under-dispersed guide: the exact mean, covariance ``factor * Sigma``.

    The importance ratios ``p(w | y) / q(w)`` then have a Pareto tail with shape ``k = 1 - factor``
    (their variance is infinite for ``factor <= 1/2``): the default 0.25 gives ``k = 0.75``, past
    PSIS's 0.7 threshold of unreliability, while ``factor = 0.8`` gives a usable ``k = 0.2``.
    """
    if not 0.0 < float(factor) < 1.0:
        raise ValueError(f"an under-dispersed guide needs 0 < factor < 1, got {factor!r}")
    return make_scaled_posterior_guide(x, y, noise_scale, prior_scale, covariance_factor=factor)


def build_linear_regression(
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
    init_scale: float = 0.1,
) -> tuple[Callable, Callable]:
    """``(model, guide)``: the model with its hyperparameters bound and the mean-field guide.

    :param noise_scale: known standard deviation of the observation noise.
    :param prior_scale: standard deviation of the prior on each weight.
    :param init_scale: initial scale of the mean-field guide.
    """
    check_positive(noise_scale=noise_scale, prior_scale=prior_scale, init_scale=init_scale)
    model = functools.partial(
        linear_regression_model, noise_scale=noise_scale, prior_scale=prior_scale
    )
    guide = functools.partial(linear_regression_guide, init_scale=init_scale)
    return model, guide
