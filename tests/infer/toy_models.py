"""Small models with closed-form answers, shared by the importance-weighted ELBO tests.

The linear-Gaussian toy (Rainforth et al. 2018; Tucker et al. 2018):
``z ~ N(mu, I_D)``, ``x | z ~ N(z, I_D)``, so ``p(x) = N(mu, 2 I)`` and
``p(z | x) = N((x + mu)/2, I/2)``.
The guide is ``q(z | x) = N(A x + b, diag(s)^2)`` (``A``, ``b``, ``s`` vectors of size ``D``, acting
elementwise), exact for ``A = 1/2``, ``b = mu/2``, ``s = sqrt(1/2)``.

Everything here is written directly with ``torch.distributions`` so that the tests can check the
loss against an independent computation.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

EXACT_A = 0.5
EXACT_S = math.sqrt(0.5)


def toy_data(num_data: int, dim: int, mu: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Draw ``x ~ p(x) = N(mu, 2 I)`` with a private generator (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return mu + math.sqrt(2.0) * torch.randn(num_data, dim, generator=generator)


def toy_model(x: torch.Tensor, mu: torch.Tensor, batch_size: int | None = None, scale: float = 1.0):
    """``z_n ~ N(mu, I)``, ``x_n | z_n ~ N(z_n, I)`` in a (possibly subsampled) data plate."""
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])


def toy_guide_params(dim: int, mu: torch.Tensor, exact: bool):
    """Return initial ``(A, b, s)``: the exact posterior, or a deliberately wrong guide."""
    if exact:
        return (
            torch.full((dim,), EXACT_A),
            mu / 2.0,
            torch.full((dim,), EXACT_S),
        )
    return (
        torch.full((dim,), 0.8),
        mu / 2.0 - 0.6,
        torch.full((dim,), 1.1),
    )


def make_toy_guide(init):
    """Return the guide ``q(z_n | x_n) = N(A x_n + b, s^2)`` with ``pyro.param`` sites A, b, s."""
    a0, b0, s0 = init

    def guide(x, mu, batch_size=None, scale=1.0):
        a = pyro.param("A", a0.clone())
        b = pyro.param("b", b0.clone())
        s = pyro.param("s", s0.clone(), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            pyro.sample("z", dist.Normal(a * x[idx] + b, s).to_event(1))

    return guide


def toy_log_evidence(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``log p(x_n)`` per data point, ``[N]``."""
    return torch.distributions.Normal(mu, math.sqrt(2.0)).log_prob(x).sum(-1)


def toy_log_weights(x, mu, a, b, s, z) -> torch.Tensor:
    """``log p(x_n, z) - log q(z | x_n)`` for ``z`` of shape ``[..., N, D]``."""
    normal = torch.distributions.Normal
    log_p = normal(mu, 1.0).log_prob(z).sum(-1) + normal(z, 1.0).log_prob(x).sum(-1)
    log_q = normal(a * x + b, s).log_prob(z).sum(-1)
    return log_p - log_q


def toy_closed_form_elbo(x, mu, a, b, s) -> torch.Tensor:
    """Closed-form ``E_q[log p(x_n, z)] - E_q[log q(z | x_n)]`` per data point, ``[N]``.

    With ``m = A x + b``: ``E_q[log N(z; mu, 1)] = -log(2 pi)/2 - ((m - mu)^2 + s^2)/2``,
    ``E_q[log N(x; z, 1)] = -log(2 pi)/2 - ((x - m)^2 + s^2)/2`` and the entropy term
    ``-E_q[log q] = log(2 pi)/2 + log s + 1/2``, each summed over the ``D`` coordinates.
    """
    m = a * x + b
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    log_prior = -half_log_2pi - 0.5 * ((m - mu) ** 2 + s**2)
    log_lik = -half_log_2pi - 0.5 * ((x - m) ** 2 + s**2)
    entropy = half_log_2pi + torch.log(s) + 0.5
    return (log_prior + log_lik + entropy).sum(-1)


# -- a model with a global latent -------------------------------------------------------------
def global_model(x: torch.Tensor, batch_size: int | None = None):
    """``z ~ N(0, 1)`` (global, scalar), ``x_n | z ~ N(z, 1)``."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def global_posterior(x: torch.Tensor) -> tuple[float, float]:
    """Exact ``p(z | x) = N(sum(x) / (N + 1), 1 / (N + 1))`` as ``(loc, scale)``."""
    n = x.shape[0]
    return float(x.sum() / (n + 1)), math.sqrt(1.0 / (n + 1))


def make_global_guide(loc: float, scale: float):
    """Return a guide ``N(q_loc, q_scale)`` for the global latent."""

    def guide(x, batch_size=None):
        q_loc = pyro.param("q_loc", torch.tensor(loc))
        q_scale = pyro.param("q_scale", torch.tensor(scale), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(q_loc, q_scale))

    return guide


def global_log_joint(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log p(x, z)`` for ``z`` of any batch shape."""
    normal = torch.distributions.Normal
    return normal(0.0, 1.0).log_prob(z) + normal(z.unsqueeze(-1), 1.0).log_prob(x).sum(-1)


def global_log_evidence(x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` for the global model: ``x ~ N(0, I + 1 1^T)``."""
    n = x.shape[0]
    cov = torch.eye(n) + torch.ones(n, n)
    return torch.distributions.MultivariateNormal(torch.zeros(n), cov).log_prob(x)


# -- guide distributions without rsample ------------------------------------------------------
class NonReparamNormal(dist.Normal):
    """A Normal whose samples carry no gradient: Pyro must use a score-function estimator."""

    has_rsample = False


# -- a model with a discrete (Bernoulli) latent --------------------------------------------------
BERNOULLI_PRIOR = 0.3
BERNOULLI_SHIFT = 2.0


def bernoulli_model(x: torch.Tensor):
    """``z_n ~ Bernoulli(0.3)``, ``x_n | z_n ~ N(2 z_n - 1, 1)``."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(BERNOULLI_PRIOR))
        pyro.sample("x", dist.Normal(BERNOULLI_SHIFT * z - 1.0, 1.0), obs=x)


def make_bernoulli_guide(init_logits: torch.Tensor):
    """``q(z_n = 1) = sigmoid(logits_n)``, one parameter per data point."""

    def guide(x):
        logits = pyro.param("logits", init_logits.clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    return guide


def bernoulli_exact_iwae_bound(x: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """``E_{z_1..K ~ q}[log (1/K) sum_k w_k]`` per point, by enumerating all ``2^K`` tuples.

    Differentiable in ``logits`` (the gradient of the IWAE bound itself).
    """
    normal = torch.distributions.Normal
    values = torch.tensor([0.0, 1.0])
    prior = torch.tensor([1.0 - BERNOULLI_PRIOR, BERNOULLI_PRIOR])
    log_q1 = torch.nn.functional.logsigmoid(logits)
    log_q0 = torch.nn.functional.logsigmoid(-logits)
    log_q = torch.stack([log_q0, log_q1], -1)  # [N, 2]
    log_p = prior.log() + normal(BERNOULLI_SHIFT * values - 1.0, 1.0).log_prob(x.unsqueeze(-1))
    log_w = log_p - log_q  # [N, 2]
    tuples = torch.cartesian_prod(*[torch.arange(2)] * k).reshape(-1, k)  # [2^K, K]
    lw = log_w[:, tuples]  # [N, 2^K, K]
    bound = torch.logsumexp(lw, -1) - math.log(k)
    log_prob_tuple = log_q[:, tuples].sum(-1)  # [N, 2^K]
    return (log_prob_tuple.exp() * bound).sum(-1)


# -- test speed ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=False)
def single_thread():
    """Run a module's tiny tensor ops on one thread (restored afterwards).

    The toy tensors are a few hundred elements: an intra-op parallel region costs more than the
    op, and on a busy machine a 2-thread barrier can cost a scheduler quantum (~20 ms) per op.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
