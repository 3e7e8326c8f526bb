"""Bayesian logistic regression with a Gaussian prior and a mean-field guide.

.. code-block:: text

    w ~ Normal(0, prior_scale^2 I_d)                   site "w", global (outside the plate)
    y_n | w ~ Bernoulli(logits = x_n . w)              site "y", in plate "data", y_n in {0, 1}

There is no closed-form posterior; :func:`laplace_approximation` gives the posterior mode and the
inverse Hessian there (Newton's method in float64), a reference that the mean-field guide's mean
approaches as ``n`` grows. An intercept is one more weight: ``make_logistic_data(...,
intercept=True)`` appends a column of ones to ``x``.

Like :mod:`models.linear_regression`, ``w`` is global: the minibatch log-likelihood is scaled by
``N / B`` under the runner's subsampling (fine for ``Trace_ELBO``), and importance-weighted bounds
must be fitted on the full data.

Example::

    import pyro
    from pyro.infer import Trace_ELBO
    from pyro_vi_ext.training import fit
    from models.logistic_regression import (
        build_logistic_regression, laplace_approximation, make_logistic_data)

    x, y, w_true = make_logistic_data(n=1000, d=3, seed=0)
    model, guide = build_logistic_regression(prior_scale=1.0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997})
    fit(model, guide, (x, y), Trace_ELBO(), optim, num_steps=1000, batch_size=100)
    mode, cov = laplace_approximation(x, y, prior_scale=1.0)
    print(pyro.param("logistic_w_loc"), mode)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
from models.linear_regression import RegressionData

__all__ = [
    "build_logistic_regression",
    "laplace_approximation",
    "logistic_regression_guide",
    "logistic_regression_model",
    "make_logistic_data",
]


def make_logistic_data(
    n: int = 100,
    d: int = 3,
    seed: int = 0,
    prior_scale: float = 1.0,
    intercept: bool = False,
    dtype: torch.dtype | None = None,
) -> RegressionData:
    """Draw a data set from the model: ``w`` from the prior, ``x`` standard normal, ``y`` in {0, 1}.

    :param n: number of rows.
    :param d: number of features (``d + 1`` columns with ``intercept``).
    :param seed: seed of a private generator (the global RNG is left alone).
    :param prior_scale: standard deviation of the prior on each weight.
    :param intercept: append a column of ones to ``x``.
    :param dtype: dtype of the tensors (default: torch's default dtype); ``y`` is float 0/1.
    """
    check_positive(prior_scale=prior_scale)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    generator = torch.Generator().manual_seed(int(seed))
    x = standard_features(n, d, generator, intercept, torch.float64)
    w = prior_scale * torch.randn(x.shape[1], generator=generator, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ w), generator=generator)
    return RegressionData(x.to(dtype), y.to(dtype), w.to(dtype))


def logistic_regression_model(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
    prior_scale: float = 1.0,
) -> torch.Tensor:
    """``w ~ N(0, prior_scale^2 I)`` (global), ``y_n ~ Bernoulli(logits=x_n . w)`` in the plate.

    ``y=None`` samples the labels. Returns the sampled or observed ``y``.
    """
    w = sample_weight_prior(x, prior_scale)
    with data_plate(x.shape[0], idx, n_data):
        logits = (x * w).sum(-1)  # w may carry particle dims [..., 1, d]
        return pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def logistic_regression_guide(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
    init_scale: float = 0.1,
) -> torch.Tensor:
    """Mean-field Normal guide ``w ~ N(logistic_w_loc, diag(logistic_w_scale)^2)``.

    The params start at ``loc = 0`` and ``scale = init_scale``.
    """
    return sample_mean_field_weights(x, "logistic", init_scale)


def laplace_approximation(
    x: torch.Tensor,
    y: torch.Tensor,
    prior_scale: float = 1.0,
    max_iterations: int = 100,
    tolerance: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mode ``[d]`` and inverse Hessian ``[d, d]`` of ``-log p(w | x, y)`` there.

    Newton's method in float64 from ``w = 0``; the log-posterior is strictly concave, so it
    converges. Returned in ``x``'s dtype.

    :raises RuntimeError: when Newton's method has not converged in ``max_iterations``.
    """
    check_positive(prior_scale=prior_scale)
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    w = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for _ in range(max_iterations):
        p = torch.sigmoid(x64 @ w)
        gradient = x64.T @ (y64 - p) - w / prior_scale**2
        hessian = (x64 * (p * (1 - p)).unsqueeze(-1)).T @ x64 + eye / prior_scale**2
        step = torch.linalg.solve(hessian, gradient)
        w = w + step
        if float(step.abs().max()) < tolerance:
            break
    else:
        raise RuntimeError(f"Newton's method did not converge in {max_iterations} iterations")
    p = torch.sigmoid(x64 @ w)
    hessian = (x64 * (p * (1 - p)).unsqueeze(-1)).T @ x64 + eye / prior_scale**2
    covariance = torch.linalg.inv(hessian)
    covariance = 0.5 * (covariance + covariance.T)
    return w.to(x.dtype), covariance.to(x.dtype)


def build_logistic_regression(
    prior_scale: float = 1.0,
    init_scale: float = 0.1,
) -> tuple[Callable, Callable]:
    """``(model, guide)``: the model with ``prior_scale`` bound and the mean-field guide.

    :param prior_scale: standard deviation of the prior on each weight.
    :param init_scale: initial scale of the mean-field guide.
    """
    check_positive(prior_scale=prior_scale, init_scale=init_scale)
    model = functools.partial(logistic_regression_model, prior_scale=prior_scale)
    guide = functools.partial(logistic_regression_guide, init_scale=init_scale)
    return model, guide
