import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from models.linear_regression import (
    FixedGaussianGuide,
    build_linear_regression,
    exact_log_evidence,
    exact_posterior,
    linear_regression_model,
    make_exact_guide,
    make_regression_data,
    make_scaled_posterior_guide,
    make_underdispersed_guide,
    mean_field_optimum,
)
from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.training import fit
from tests.models._helpers import GLOBAL_LATENT_LOSSES, IW_ESTIMATORS, make_loss, train_and_check

NOISE, PRIOR = 0.7, 1.5


@pytest.fixture
def data():
    return make_regression_data(n=24, d=3, seed=0, noise_scale=NOISE, prior_scale=PRIOR)


@pytest.mark.parametrize("loss_name", GLOBAL_LATENT_LOSSES)
def test_trains_with_every_loss_on_full_data(data, loss_name):
    model, guide = build_linear_regression(noise_scale=NOISE, prior_scale=PRIOR)
    train_and_check(model, guide, make_loss(loss_name), (data.x, data.y))
    assert set(pyro.get_param_store().keys()) == {"linear_w_loc", "linear_w_scale"}


def test_trains_with_trace_elbo_on_minibatches(data):
    model, guide = build_linear_regression(noise_scale=NOISE, prior_scale=PRIOR)
    idx = torch.tensor([0, 5, 6, 13, 20, 23])
    kwargs = {"idx": idx, "n_data": len(data.x)}
    train_and_check(model, guide, Trace_ELBO(), (data.x[idx], data.y[idx]), kwargs)


@pytest.mark.parametrize("estimator", IW_ESTIMATORS)
def test_subsampled_importance_weighting_raises(data, estimator):
    """w is global: no unbiased minibatch importance-weighted bound exists."""
    model, guide = build_linear_regression()
    idx = torch.arange(6)
    loss = ImportanceWeightedELBO(num_particles=3, estimator=estimator)
    with pytest.raises(ValueError, match="subsampled"):
        loss.loss(model, guide, data.x[idx], data.y[idx], idx=idx, n_data=len(data.x))


def test_exact_posterior_matches_gaussian_conditioning(data):
    """Condition the joint Gaussian of (w, y) on y: a computation in n dims instead of d."""
    x, y = data.x.double(), data.y.double()
    n, d = x.shape
    cov_wy = PRIOR**2 * x.T  # Cov(w, y)
    cov_yy = NOISE**2 * torch.eye(n, dtype=torch.float64) + PRIOR**2 * x @ x.T
    gain = torch.linalg.solve(cov_yy, cov_wy.T).T
    mean = gain @ y
    covariance = PRIOR**2 * torch.eye(d, dtype=torch.float64) - gain @ cov_wy.T
    got_mean, got_cov = exact_posterior(x, y, noise_scale=NOISE, prior_scale=PRIOR)
    assert got_mean.dtype == torch.float64
    assert torch.allclose(got_mean, mean, atol=1e-10)
    assert torch.allclose(got_cov, covariance, atol=1e-10)
    # float32 inputs give float32 answers of the same values
    mean32, cov32 = exact_posterior(data.x, data.y, NOISE, PRIOR)
    assert mean32.dtype == torch.float32
    assert torch.allclose(mean32.double(), mean, atol=1e-5)
    assert torch.allclose(cov32.double(), covariance, atol=1e-6)


def test_exact_log_evidence_matches_the_marginal_gaussian(data):
    x, y = data.x.double(), data.y.double()
    n = x.shape[0]
    cov = NOISE**2 * torch.eye(n, dtype=torch.float64) + PRIOR**2 * x @ x.T
    direct = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(y)
    assert exact_log_evidence(data.x, data.y, NOISE, PRIOR) == pytest.approx(
        float(direct), abs=1e-4
    )


def test_exact_log_evidence_matches_quadrature_in_one_dimension():
    """log of the integral of p(y | w) p(w) dw over a fine grid, for d = 1."""
    x, y, _ = make_regression_data(n=15, d=1, seed=3, noise_scale=NOISE, prior_scale=PRIOR)
    w = torch.linspace(-12.0, 12.0, 200_001, dtype=torch.float64)
    log_prior = dist.Normal(0.0, PRIOR).log_prob(w)
    mean = w[:, None] * x.double()[:, 0]
    log_lik = dist.Normal(mean, NOISE).log_prob(y.double()).sum(-1)
    integrand = log_prior + log_lik
    step = float(w[1] - w[0])
    quadrature = float(torch.logsumexp(integrand, 0)) + math.log(step)
    assert exact_log_evidence(x, y, NOISE, PRIOR) == pytest.approx(quadrature, abs=1e-6)


def test_exact_guide_makes_every_bound_tight(data):
    """With q the exact posterior, log p(x, y, w) - log q(w) = log p(y) for every draw."""
    model, _ = build_linear_regression(noise_scale=NOISE, prior_scale=PRIOR)
    guide = make_exact_guide(data.x, data.y, NOISE, PRIOR)
    evidence = exact_log_evidence(data.x, data.y, NOISE, PRIOR)
    for _ in range(3):
        assert -Trace_ELBO().loss(model, guide, data.x, data.y) == pytest.approx(evidence, abs=1e-3)
    for estimator in IW_ESTIMATORS:
        loss = ImportanceWeightedELBO(num_particles=5, estimator=estimator)
        assert -loss.loss(model, guide, data.x, data.y) == pytest.approx(evidence, abs=1e-3)
    assert loss.last_terms["ess"] == pytest.approx(5.0, abs=1e-3)


def test_underdispersed_guide_has_a_gap_that_importance_weighting_shrinks(data):
    model, _ = build_linear_regression(noise_scale=NOISE, prior_scale=PRIOR)
    guide = make_underdispersed_guide(data.x, data.y, NOISE, PRIOR, factor=0.25)
    mean, cov = exact_posterior(data.x, data.y, NOISE, PRIOR)
    assert torch.allclose(guide.mean, mean) and torch.allclose(guide.covariance, 0.25 * cov)
    evidence = exact_log_evidence(data.x, data.y, NOISE, PRIOR)
    # exact gap: KL(q || p) = 1/2 (d f - d - d log f) for q = N(m, f S), p = N(m, S)
    d, f = 3, 0.25
    gap = 0.5 * (d * f - d - d * math.log(f))
    pyro.set_rng_seed(1)
    loss = ImportanceWeightedELBO(num_particles=50, num_outer=40)  # 2000 draws in one call
    bound = -loss.loss(model, guide, data.x, data.y)
    # last_terms are per data point; the whole-dataset ELBO is N times it
    assert loss.last_terms["elbo"] * len(data.y) == pytest.approx(evidence - gap, abs=0.1)
    assert evidence - gap + 0.3 < bound <= evidence + 1e-3


def test_scaled_and_underdispersed_guide_arguments(data):
    over = make_scaled_posterior_guide(data.x, data.y, NOISE, PRIOR, covariance_factor=2.0)
    _, cov = exact_posterior(data.x, data.y, NOISE, PRIOR)
    assert torch.allclose(over.covariance, 2.0 * cov)
    with pytest.raises(ValueError, match="0 < factor < 1"):
        make_underdispersed_guide(data.x, data.y, factor=1.5)
    with pytest.raises(ValueError, match="covariance_factor"):
        make_scaled_posterior_guide(data.x, data.y, covariance_factor=0.0)
    with pytest.raises(ValueError, match=r"\[d, d\]"):
        FixedGaussianGuide(torch.zeros(2), torch.eye(3))
    # the guide ignores the minibatch and samples the global w in the inputs' dtype
    guide = make_exact_guide(data.x, data.y)
    trace = poutine.trace(guide).get_trace(
        data.x[:2].double(), data.y[:2].double(), idx=torch.arange(2), n_data=24
    )
    assert trace.nodes["w"]["value"].shape == (3,)
    assert trace.nodes["w"]["value"].dtype == torch.float64


def test_mean_field_optimum_is_a_stationary_point_of_the_kl(data):
    mean, cov = exact_posterior(data.x.double(), data.y.double(), NOISE, PRIOR)
    loc, scale = mean_field_optimum(data.x.double(), data.y.double(), NOISE, PRIOR)
    assert torch.allclose(loc, mean)
    assert (scale**2 <= torch.diagonal(cov) + 1e-12).all()  # mean field under-estimates
    loc = loc.clone().requires_grad_()
    log_scale = scale.log().clone().requires_grad_()
    posterior = dist.MultivariateNormal(mean, cov)

    def kl(loc, log_scale):
        q = dist.MultivariateNormal(loc, scale_tril=torch.diag(log_scale.exp()))
        return torch.distributions.kl_divergence(q, posterior)

    grads = torch.autograd.grad(kl(loc, log_scale), (loc, log_scale))
    assert all(float(g.abs().max()) < 1e-8 for g in grads)
    with torch.no_grad():
        assert float(kl(loc, log_scale + 0.1)) > float(kl(loc, log_scale))


def test_minibatch_log_likelihood_is_scaled_and_unbiased(data):
    """Scale N/B on y, and the minibatch log-joint averages exactly to the full one."""
    model, _ = build_linear_regression(noise_scale=NOISE, prior_scale=PRIOR)
    w = torch.tensor([0.3, -1.0, 2.0])
    conditioned = poutine.condition(model, data={"w": w})
    full = poutine.trace(conditioned).get_trace(data.x, data.y)
    n, batch = len(data.x), 6
    assert full.nodes["y"]["scale"] == 1.0
    estimates = []
    for idx in torch.randperm(n).split(batch):
        trace = poutine.trace(conditioned).get_trace(data.x[idx], data.y[idx], idx=idx, n_data=n)
        assert trace.nodes["y"]["scale"] == pytest.approx(n / batch)
        assert trace.nodes["w"]["scale"] == 1.0
        estimates.append(trace.log_prob_sum())
    assert torch.allclose(torch.stack(estimates).mean(), full.log_prob_sum(), atol=1e-3)
    expected = dist.Normal(data.x @ w, NOISE).log_prob(data.y).sum()
    expected = expected + dist.Normal(0.0, PRIOR).log_prob(w).sum()
    assert torch.allclose(full.log_prob_sum(), expected, atol=1e-4)


def test_data_generator_and_prior_predictive():
    a = make_regression_data(n=10, d=2, seed=5)
    b = make_regression_data(n=10, d=2, seed=5)
    c = make_regression_data(n=10, d=2, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.x, c.x)
    x, y, w = make_regression_data(n=10, d=2, seed=5, intercept=True, dtype=torch.float64)
    assert x.shape == (10, 3) and y.shape == (10,) and w.shape == (3,)
    assert x.dtype == torch.float64 and torch.equal(x[:, -1], torch.ones(10, dtype=torch.float64))
    # a large noise-free draw recovers its weights by least squares
    big = make_regression_data(n=500, d=2, seed=1, noise_scale=1e-3)
    solution = torch.linalg.lstsq(big.x, big.y.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(solution, big.w, atol=1e-2)
    # y=None samples the targets
    assert linear_regression_model(a.x).shape == (10,)
    with pytest.raises(ValueError, match="noise_scale"):
        make_regression_data(noise_scale=0.0)
    with pytest.raises(ValueError, match="prior_scale"):
        build_linear_regression(prior_scale=-1.0)


def test_fit_on_minibatches_recovers_the_exact_posterior():
    """The runner's minibatches (N/B scaling) target the full-data posterior: without the
    scaling the guide's scales would come out about sqrt(N/B) = 3.2 times too wide."""
    x, y, _ = make_regression_data(n=400, d=2, seed=2, noise_scale=NOISE, prior_scale=PRIOR)
    model, guide = build_linear_regression(noise_scale=NOISE, prior_scale=PRIOR, init_scale=0.05)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    fit(model, guide, (x, y), Trace_ELBO(), optim, num_steps=300, batch_size=40, progress=False)
    loc, scale = mean_field_optimum(x, y, NOISE, PRIOR)
    assert torch.allclose(pyro.param("linear_w_loc").detach(), loc, atol=float(scale.max()))
    assert torch.allclose(pyro.param("linear_w_scale").detach(), scale, rtol=0.5)
