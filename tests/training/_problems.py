"""Small models shared by the training tests (all follow fit's minibatch convention)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

SIGMA = 1.0  # observation noise of the regression
TAU = 1.0  # prior scale of the regression weights


def regression_data(n: int = 250, d: int = 2, seed: int = 1):
    """Draw regression data and the exact Gaussian posterior (mean, covariance)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w_true = torch.linspace(1.0, -2.0, d)
    y = x @ w_true + SIGMA * torch.randn(n, generator=gen)
    precision = x.T @ x / SIGMA**2 + torch.eye(d) / TAU**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / SIGMA**2
    return x, y, mean, cov


def regression_model(x, y=None, *, idx=None, n_data=None):
    n_data = x.shape[0] if n_data is None else n_data
    w = pyro.sample("w", dist.Normal(0.0, TAU).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", size=n_data, subsample=idx):
        pyro.sample("y", dist.Normal((x * w).sum(-1), SIGMA), obs=y)


def regression_guide(x, y=None, *, idx=None, n_data=None):
    """Full-rank Gaussian guide: the exact posterior is in the family."""
    d = x.shape[-1]
    loc = pyro.param("loc", torch.zeros(d))
    scale_tril = pyro.param("scale_tril", 0.1 * torch.eye(d), constraint=constraints.lower_cholesky)
    pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def delta_guide(x, y=None, *, idx=None, n_data=None):
    """Point-mass (MAP) guide: the loss is deterministic given the minibatch."""
    loc = pyro.param("loc", torch.zeros(x.shape[-1]))
    pyro.sample("w", dist.Delta(loc).to_event(1))


class LocalLatentModel:
    """z_n ~ N(0, I_k), x_n ~ N(W z_n + b, s^2 I) with an amortized linear-Gaussian encoder."""

    def __init__(self, dim: int = 4, latent: int = 2, seed: int = 0):
        torch.manual_seed(seed)
        self.dim, self.latent = dim, latent
        self.encoder = nn.Linear(dim, 2 * latent)

    def data(self, n: int = 64, seed: int = 3) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.latent, self.dim, generator=gen)
        z = torch.randn(n, self.latent, generator=gen)
        return z @ w + 0.3 * torch.randn(n, self.dim, generator=gen)

    def model(self, x, *, idx=None, n_data=None):
        n_data = x.shape[0] if n_data is None else n_data
        w = pyro.param("W", 0.1 * torch.ones(self.latent, self.dim))
        b = pyro.param("b", torch.zeros(self.dim))
        with pyro.plate("data", size=n_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w + b, 0.3).to_event(1), obs=x)

    def guide(self, x, *, idx=None, n_data=None):
        pyro.module("encoder", self.encoder)
        n_data = x.shape[0] if n_data is None else n_data
        with pyro.plate("data", size=n_data, subsample=idx):
            loc, s = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))
