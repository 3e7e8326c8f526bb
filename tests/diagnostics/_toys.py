"""Models with exact posteriors and evidences for the diagnostics tests.

* Bayesian linear regression with a conjugate prior (``models.linear_regression``): global ``w``,
  whole-trace weights, exact evidence and posterior.
* The local-latent Gaussian toy of Rainforth et al. (2018): ``z_n ~ N(mu, I)``,
  ``x_n | z_n ~ N(z_n, I)`` in plate ``"data"``, so ``p(x_n) = N(mu, 2 I)`` and
  ``p(z_n | x_n) = N((x_n + mu) / 2, I / 2)``; an amortized guide ``N((x_n + mu) / 2 + shift,
  (scale^2 / 2) I)`` is exact for ``scale = 1, shift = 0``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from models.linear_regression import (
    exact_log_evidence,
    exact_posterior,
    linear_regression_model,
    make_regression_data,
)

NOISE_SCALE = 1.0
PRIOR_SCALE = 1.0


@dataclass(frozen=True)
class Regression:
    x: torch.Tensor
    y: torch.Tensor
    model: object
    mean: torch.Tensor  # exact posterior mean, float64
    cov: torch.Tensor  # exact posterior covariance, float64
    log_evidence: float

    @property
    def args(self) -> tuple:
        return (self.x, self.y)


def make_regression() -> Regression:
    data = make_regression_data(n=50, d=3, seed=0, noise_scale=NOISE_SCALE, prior_scale=PRIOR_SCALE)
    x64, y64 = data.x.double(), data.y.double()
    mean, cov = exact_posterior(x64, y64, NOISE_SCALE, PRIOR_SCALE)
    model = functools.partial(
        linear_regression_model, noise_scale=NOISE_SCALE, prior_scale=PRIOR_SCALE
    )
    return Regression(
        x=data.x,
        y=data.y,
        model=model,
        mean=mean,
        cov=cov,
        log_evidence=exact_log_evidence(x64, y64, NOISE_SCALE, PRIOR_SCALE),
    )


def gaussian_guide(mean: torch.Tensor, cov: torch.Tensor):
    """``w ~ MultivariateNormal(mean, cov)`` with the regression model's signature."""
    loc = mean.float()
    scale_tril = torch.linalg.cholesky(cov).float()

    def guide(x, y=None, **_):
        return pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    return guide


@dataclass(frozen=True)
class LocalToy:
    x: torch.Tensor
    mu: torch.Tensor

    def model(self, x, subsample_size=None):
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(self.mu, 1.0).to_event(1))
            pyro.deterministic("z_norm", z.norm(dim=-1), event_dim=0)
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])

    def guide(self, scale: float = 1.0, shift: float = 0.0):
        def guide(x, subsample_size=None):
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
                loc = (x[idx] + self.mu) / 2 + shift
                pyro.sample("z", dist.Normal(loc, scale * math.sqrt(0.5)).to_event(1))

        return guide

    def exact_log_evidence(self) -> torch.Tensor:
        """``[N]`` float64 ``log p(x_n)``."""
        return dist.Normal(self.mu.double(), math.sqrt(2.0)).to_event(1).log_prob(self.x.double())

    def exact_posterior_mean(self) -> torch.Tensor:
        return (self.x.double() + self.mu.double()) / 2


def make_local_toy() -> LocalToy:
    generator = torch.Generator().manual_seed(1)
    mu = torch.tensor([0.5, -1.0])
    x = mu + math.sqrt(2.0) * torch.randn(40, 2, generator=generator)
    return LocalToy(x=x, mu=mu)
