import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from models.logistic_regression import (
    build_logistic_regression,
    laplace_approximation,
    logistic_regression_model,
    make_logistic_data,
)
from pyro_vi_ext import ImportanceWeightedELBO
from tests.models._helpers import GLOBAL_LATENT_LOSSES, IW_ESTIMATORS, make_loss, train_and_check

PRIOR = 2.0


@pytest.fixture
def data():
    return make_logistic_data(n=30, d=2, seed=0, prior_scale=PRIOR, intercept=True)


@pytest.mark.parametrize("loss_name", GLOBAL_LATENT_LOSSES)
def test_trains_with_every_loss_on_full_data(data, loss_name):
    model, guide = build_logistic_regression(prior_scale=PRIOR)
    train_and_check(model, guide, make_loss(loss_name), (data.x, data.y))
    assert set(pyro.get_param_store().keys()) == {"logistic_w_loc", "logistic_w_scale"}


def test_trains_with_trace_elbo_on_minibatches(data):
    model, guide = build_logistic_regression(prior_scale=PRIOR)
    idx = torch.tensor([1, 4, 9, 16, 25])
    kwargs = {"idx": idx, "n_data": len(data.x)}
    train_and_check(model, guide, Trace_ELBO(), (data.x[idx], data.y[idx]), kwargs)


@pytest.mark.parametrize("estimator", IW_ESTIMATORS)
def test_subsampled_importance_weighting_raises(data, estimator):
    model, guide = build_logistic_regression()
    idx = torch.arange(5)
    loss = ImportanceWeightedELBO(num_particles=3, estimator=estimator)
    with pytest.raises(ValueError, match="subsampled"):
        loss.loss(model, guide, data.x[idx], data.y[idx], idx=idx, n_data=len(data.x))


def _log_joint(model, w, x, y, **kwargs):
    conditioned = poutine.condition(model, data={"w": w})
    return poutine.trace(conditioned).get_trace(x, y, **kwargs).log_prob_sum()


def test_laplace_mode_and_curvature_match_the_model(data):
    """The gradient of the model's log-joint vanishes at the mode, and its Hessian is -cov^-1."""
    model, _ = build_logistic_regression(prior_scale=PRIOR)
    x, y = data.x.double(), data.y.double()
    mode, covariance = laplace_approximation(x, y, prior_scale=PRIOR)
    w = mode.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_log_joint(model, w, x, y), w)
    assert float(grad.abs().max()) < 1e-8
    hessian = torch.autograd.functional.hessian(lambda v: _log_joint(model, v, x, y), mode)
    assert torch.allclose(-torch.linalg.inv(hessian), covariance, atol=1e-8)
    mode32, cov32 = laplace_approximation(data.x, data.y, prior_scale=PRIOR)
    assert mode32.dtype == cov32.dtype == torch.float32
    with pytest.raises(RuntimeError, match="converge"):
        laplace_approximation(x, y, prior_scale=PRIOR, max_iterations=1)


def test_mean_field_guide_approaches_the_laplace_approximation():
    """For a large data set the posterior is nearly Gaussian: the mean-field guide finds its mode,
    and its scales approach the mean-field optimum of the Laplace Gaussian, 1 / sqrt(H_ii)."""
    pyro.set_rng_seed(0)
    x, y, _ = make_logistic_data(n=1000, d=2, seed=1)
    model, guide = build_logistic_regression()
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.99}), Trace_ELBO())
    for _ in range(150):
        svi.step(x, y)
    mode, covariance = laplace_approximation(x, y)
    loc = pyro.param("logistic_w_loc").detach()
    scale = pyro.param("logistic_w_scale").detach()
    assert torch.allclose(loc, mode, atol=0.5 * float(covariance.diagonal().sqrt().min()))
    optimum = torch.linalg.inv(covariance).diagonal().rsqrt()
    assert torch.allclose(scale, optimum, rtol=0.2)


def test_minibatch_log_likelihood_is_scaled_and_unbiased(data):
    model, _ = build_logistic_regression(prior_scale=PRIOR)
    w = torch.tensor([1.0, -0.5, 0.2])
    n, batch = len(data.x), 5
    full = _log_joint(model, w, data.x, data.y)
    estimates = []
    for idx in torch.randperm(n).split(batch):
        trace = poutine.trace(poutine.condition(model, data={"w": w})).get_trace(
            data.x[idx], data.y[idx], idx=idx, n_data=n
        )
        assert trace.nodes["y"]["scale"] == pytest.approx(n / batch)
        estimates.append(trace.log_prob_sum())
    assert torch.allclose(torch.stack(estimates).mean(), full, atol=1e-4)
    expected = dist.Bernoulli(logits=data.x @ w).log_prob(data.y).sum()
    expected = expected + dist.Normal(0.0, PRIOR).log_prob(w).sum()
    assert torch.allclose(full, expected, atol=1e-4)


def test_data_generator_and_prior_predictive():
    a = make_logistic_data(n=50, d=2, seed=4)
    b = make_logistic_data(n=50, d=2, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert a.x.shape == (50, 2) and a.y.shape == (50,) and a.w.shape == (2,)
    assert set(a.y.unique().tolist()) <= {0.0, 1.0}
    x, _, w = make_logistic_data(n=5, d=2, seed=4, intercept=True)
    assert x.shape == (5, 3) and w.shape == (3,) and torch.equal(x[:, -1], torch.ones(5))
    # labels follow the weights: calibrated on average, and mostly on the side of the logit
    big = make_logistic_data(n=4000, d=2, seed=0)
    probs = torch.sigmoid(big.x @ big.w)
    assert float(big.y.mean()) == pytest.approx(float(probs.mean()), abs=0.03)
    assert float(big.y[probs > 0.5].mean()) > 0.7 > 0.3 > float(big.y[probs < 0.5].mean())
    sampled = logistic_regression_model(a.x)
    assert sampled.shape == (50,) and set(sampled.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="prior_scale"):
        make_logistic_data(prior_scale=float("nan"))
