"""Probabilistic PCA: the closed forms checked against identities, Monte Carlo and Pyro itself."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from models.ppca import PPCA, build_ppca, make_linear_gaussian_guide


@pytest.fixture
def ppca() -> PPCA:
    """Build a PPCA with a 3-D code and moderately correlated loadings."""
    return build_ppca(x_dim=4, z_dim=3, noise_scale=0.7, column_correlation=0.6, seed=3)


def _log_joint(ppca: PPCA, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    normal = torch.distributions.Normal
    log_prior = normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = normal(z @ ppca.loadings.T, ppca.noise_scale).log_prob(x).sum(-1)
    return log_prior + log_lik


def test_bayes_identity_ties_evidence_and_posterior(ppca):
    """Check log p(x) = log p(x, z) - log p(z | x) for arbitrary z."""
    # log p(x) = log p(x, z) - log p(z | x) for every z
    x = ppca.sample(5, seed=0)
    z = torch.randn(5, 3, dtype=torch.float64)
    posterior = torch.distributions.MultivariateNormal(
        ppca.posterior_mean(x), covariance_matrix=ppca.posterior_covariance()
    )
    implied = _log_joint(ppca, x, z) - posterior.log_prob(z)
    torch.testing.assert_close(implied, ppca.log_evidence(x))


def test_gaussian_elbo_matches_monte_carlo(ppca):
    """The closed-form Gaussian ELBO is its Monte Carlo average."""
    x = ppca.sample(3, seed=1)
    generator = torch.Generator().manual_seed(2)
    loc = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    factor = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    covariance = factor @ factor.T + 0.2 * torch.eye(3, dtype=torch.float64)
    q = torch.distributions.MultivariateNormal(loc, covariance_matrix=covariance)
    z = q.sample((20000,))
    draws = _log_joint(ppca, x, z) - q.log_prob(z)  # [S, N]
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    exact = ppca.gaussian_elbo(x, loc, covariance)
    assert torch.all((mean - exact).abs() < 4 * se)
    assert torch.all(exact < ppca.log_evidence(x))


def test_best_factorized_gaussian_is_a_stationary_point(ppca):
    """The ELBO's gradient vanishes at the best factorized Gaussian; its gap is closed form."""
    x = ppca.sample(2, seed=4)
    loc = ppca.posterior_mean(x).clone().requires_grad_(True)
    log_var = (2 * ppca.best_factorized_scale().log()).clone().requires_grad_(True)
    elbo = ppca.gaussian_elbo(x, loc, torch.diag(log_var.exp())).sum()
    grad_loc, grad_log_var = torch.autograd.grad(elbo, (loc, log_var))
    assert grad_loc.abs().max() < 1e-10 and grad_log_var.abs().max() < 1e-10
    best = ppca.gaussian_elbo(x, loc.detach(), torch.diag(log_var.detach().exp()))
    torch.testing.assert_close(ppca.log_evidence(x) - best, ppca.approximation_gap().expand(2))
    assert float(ppca.approximation_gap()) > 0.05


def test_pyro_model_and_guide_log_densities(ppca):
    """The Pyro model and guide have the hand-written log-densities."""
    x = ppca.sample(6, seed=5)
    a, b = ppca.posterior_mean_map()
    scale = ppca.best_factorized_scale()
    guide = make_linear_gaussian_guide(a, b, scale)
    guide_trace = poutine.trace(guide).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    model_trace = poutine.trace(poutine.replay(ppca.model, trace=guide_trace)).get_trace(x)
    torch.testing.assert_close(model_trace.log_prob_sum(), _log_joint(ppca, x, z).sum())
    expected_q = torch.distributions.Normal(ppca.posterior_mean(x), scale).log_prob(z).sum()
    torch.testing.assert_close(guide_trace.log_prob_sum(), expected_q)


def test_minibatch_convention_scales_by_n_over_b(ppca):
    """model(x[idx], idx=idx, n_data=N) scales the likelihood by N / B."""
    x = ppca.sample(8, seed=6)
    idx = torch.tensor([1, 5])
    trace = poutine.trace(ppca.model).get_trace(x[idx], idx=idx, n_data=8)
    assert trace.nodes["x"]["scale"] == pytest.approx(4.0)


def test_invalid_arguments_are_refused():
    """Bad correlations, scales and shapes are refused."""
    with pytest.raises(ValueError, match="column_correlation"):
        build_ppca(z_dim=3, column_correlation=-0.9)
    with pytest.raises(ValueError, match="noise_scale"):
        build_ppca(noise_scale=0.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        make_linear_gaussian_guide(torch.zeros(2, 3), torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="loadings"):
        PPCA(loadings=torch.zeros(3), noise_scale=1.0)
    pyro.clear_param_store()
