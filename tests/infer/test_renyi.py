"""RenyiAlphaELBO: the Renyi-alpha bound per data point against closed forms and torch.

Linear-Gaussian toy of ``toy_models.py``: ``z ~ N(mu, I)``, ``x | z ~ N(z, I)``, guide
``N(A x + b, s^2)``. Statistical checks use fixed seeds and tolerances of a few standard errors.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO

from pyro_vi_ext import ImportanceWeightedELBO, RenyiAlphaELBO
from pyro_vi_ext.infer._bounds import Bound, normalized_weights
from tests.infer.test_importance_weighted_gradients import (
    make_replicated_guide,
    param_grads,
    replicated_model,
)
from tests.infer.toy_models import (
    make_toy_guide,
    single_thread,  # noqa: F401 (a fixture)
    toy_data,
    toy_guide_params,
    toy_log_evidence,
    toy_log_weights,
    toy_model,
)

D, N = 3, 10
MU = torch.tensor([0.5, -1.0, 2.0])
ESTIMATORS = ("iwae", "stl", "dreg")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def x():
    """Return the toy data set."""
    return toy_data(N, D, MU)


def _mean_se(values) -> tuple[float, float]:
    values = torch.as_tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def _same_draw_log_weights(x, init, num_draws, seed):
    """``[S, N]`` log-weights of the toy on the draws the loss makes after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    a, b, s = init
    z = a * x + b + s * torch.randn(num_draws, *x.shape)
    return toy_log_weights(x, MU, a, b, s, z)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
def test_value_equals_torch_on_the_same_draws(x, alpha):
    """Check: value equals torch on the same draws."""
    init = toy_guide_params(D, MU, exact=False)
    k, outer = 6, 2
    loss = RenyiAlphaELBO(num_particles=k, alpha=alpha, num_outer=outer, max_plate_nesting=1)
    torch.manual_seed(4)
    value = loss.loss(toy_model, make_toy_guide(init), x, MU)
    lw = _same_draw_log_weights(x, init, outer * k, 4).reshape(outer, k, N).double()
    if alpha == 1.0:
        expected = lw.mean(1)
    else:
        expected = torch.log(torch.exp((1 - alpha) * lw).mean(1)) / (1 - alpha)
    assert value == pytest.approx(-float(expected.mean(0).sum()), rel=1e-5)
    assert loss.last_terms["renyi_bound"] == pytest.approx(-value / N, rel=1e-6)


def test_alpha_zero_is_iwae_alpha_one_is_the_elbo_and_the_bound_falls_with_alpha(x):
    """Check: alpha zero is iwae alpha one is the elbo and the bound falls with alpha."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    k = 8

    def value(loss):  # max_plate_nesting given: no guessing run draws from the RNG first
        torch.manual_seed(5)
        return -loss.loss(toy_model, guide, x, MU)

    iwae = value(ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1))
    assert value(RenyiAlphaELBO(num_particles=k, alpha=0.0, max_plate_nesting=1)) == pytest.approx(
        iwae, rel=1e-6
    )
    elbo_loss = RenyiAlphaELBO(num_particles=k, alpha=1.0, max_plate_nesting=1)
    elbo = value(elbo_loss)
    assert elbo_loss.last_terms["elbo"] == pytest.approx(elbo / N, rel=1e-6)
    assert value(
        RenyiAlphaELBO(num_particles=k, alpha=1.0 - 1e-5, max_plate_nesting=1)
    ) == pytest.approx(elbo, rel=1e-4)
    alphas = [0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 4.0]
    values = [value(RenyiAlphaELBO(num_particles=k, alpha=a, max_plate_nesting=1)) for a in alphas]
    assert all(later <= earlier + 1e-4 for earlier, later in zip(values, values[1:], strict=False))
    assert values[0] > values[-1] + 1.0  # a real spread, not a constant


@pytest.mark.parametrize("k", [1, 4, 20])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_exact_posterior_gives_log_evidence_for_every_alpha_and_k(x, alpha, k):
    """Check: exact posterior gives log evidence for every alpha and k."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=True))
    loss = RenyiAlphaELBO(num_particles=k, alpha=alpha, num_outer=2)
    value = loss.loss(toy_model, guide, x, MU)
    assert value == pytest.approx(-float(toy_log_evidence(x, MU).sum()), rel=1e-5)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_exact_posterior_stl_and_dreg_guide_gradients_vanish(x, alpha, k):
    """Check: exact posterior stl and dreg guide gradients vanish."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=True))
    for estimator in ("stl", "dreg"):
        pyro.clear_param_store()
        loss = RenyiAlphaELBO(num_particles=k, alpha=alpha, num_outer=2, estimator=estimator)
        loss.loss_and_grads(toy_model, guide, x, MU)
        store = pyro.get_param_store()
        for name in ("A", "b", "s"):
            grad = store.get_param(name).unconstrained().grad
            assert float(grad.abs().max()) < 1e-4, (estimator, name)


# -- subsampling: the factor after the log-mean-exp ----------------------------------------------
SUB_N, SUB_D, SUB_B, SUB_K, SUB_ALPHA = 20, 2, 5, 10, 0.5
SUB_MU = torch.tensor([0.5, -1.0])


def _full_data_expected_bound(x, init, num_draws=4000):
    """``sum_n E[L_alpha(x_n)]`` by plain Monte Carlo in torch, with its standard error."""
    generator = torch.Generator().manual_seed(99)
    a, b, s = init
    z = a * x + b + s * torch.randn(num_draws, SUB_K, *x.shape, generator=generator)
    lw = toy_log_weights(x, SUB_MU, a, b, s, z)  # [draws, K, N]
    exponent = 1.0 - SUB_ALPHA
    per_point = (torch.logsumexp(exponent * lw, 1) - math.log(SUB_K)) / exponent
    total = per_point.sum(-1).double()
    return float(total.mean()), float(total.std() / math.sqrt(num_draws))


def test_minibatch_mean_equals_the_full_data_bound_and_pyro_renyi_misses():
    """Check: minibatch mean equals the full data bound and pyro renyi misses."""
    x = toy_data(SUB_N, SUB_D, SUB_MU, seed=1)
    init = toy_guide_params(SUB_D, SUB_MU, exact=False)
    guide = make_toy_guide(init)
    target, target_se = _full_data_expected_bound(x, init)

    ours = RenyiAlphaELBO(num_particles=SUB_K, alpha=SUB_ALPHA, num_outer=20, max_plate_nesting=1)
    full_mean, full_se = _mean_se([-ours.loss(toy_model, guide, x, SUB_MU) for _ in range(10)])
    assert abs(full_mean - target) < 4 * math.hypot(full_se, target_se)
    minibatch = [-ours.loss(toy_model, guide, x, SUB_MU, SUB_B) for _ in range(200)]
    mean, se = _mean_se(minibatch)
    assert abs(mean - target) < 4 * math.hypot(se, target_se)

    pyros = RenyiELBO(
        alpha=SUB_ALPHA, num_particles=SUB_K, vectorize_particles=True, max_plate_nesting=1
    )
    pyro_full, pyro_full_se = _mean_se(
        [-pyros.loss(toy_model, guide, x, SUB_MU) for _ in range(100)]
    )
    assert abs(pyro_full - target) < 4 * math.hypot(pyro_full_se, target_se)  # fine unsubsampled
    pyro_mean, pyro_se = _mean_se(
        [-pyros.loss(toy_model, guide, x, SUB_MU, SUB_B) for _ in range(200)]
    )
    assert abs(pyro_mean - target) > 10 * math.hypot(pyro_se, target_se)  # biased


# -- gradients ----------------------------------------------------------------------------------
def _replicated_grads(estimator, k, alpha, replicates):
    pyro.clear_param_store()
    x = torch.tensor([1.0, -0.5]).expand(replicates, 2)
    loss = RenyiAlphaELBO(num_particles=k, alpha=alpha, estimator=estimator, max_plate_nesting=1)
    loss.loss_and_grads(replicated_model, make_replicated_guide(), x)
    grads = param_grads(["loc", "scale"])
    return grads["loc"], grads["scale"]


def _assert_same_mean(a, b, n_se=4.0):
    se = torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])
    assert ((a.mean(0) - b.mean(0)).abs() < n_se * se).all(), (a.mean(0), b.mean(0), se)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_dreg_has_the_expectation_of_the_reparameterized_gradient(alpha):
    """Check: dreg has the expectation of the reparameterized gradient.

    The derived DReG coefficients alpha v + (1 - alpha) v^2 keep the gradient unbiased; with
    per-point guide parameters and identical data each point is one independent replicate.
    """
    replicates, k = 4000, 5
    pyro.set_rng_seed(0)
    plain_loc, plain_scale = _replicated_grads("iwae", k, alpha, replicates)
    dreg_loc, dreg_scale = _replicated_grads("dreg", k, alpha, replicates)
    _assert_same_mean(plain_loc, dreg_loc)
    _assert_same_mean(plain_scale, dreg_scale)
    assert (dreg_loc.var(0) < plain_loc.var(0)).all()


class _IwaeCoefficientsRenyi(Bound):
    """The Renyi bound with IWAE's DReG coefficients v_k^2 in place of the derived ones."""

    def path_weights(self, log_weights):
        return normalized_weights(log_weights, 1.0 - self.alpha) ** 2


class _WrongDregRenyi(RenyiAlphaELBO):
    def bound(self):
        return _IwaeCoefficientsRenyi("renyi", alpha=self.alpha)


def test_iwae_dreg_coefficients_would_be_biased_for_the_renyi_bound():
    """The derivation matters: reusing Tucker et al.'s v^2 for alpha = 0.5 shifts the mean."""
    replicates, k, alpha = 4000, 5, 0.5
    pyro.set_rng_seed(2)
    plain_loc, plain_scale = _replicated_grads("iwae", k, alpha, replicates)
    pyro.clear_param_store()
    x = torch.tensor([1.0, -0.5]).expand(replicates, 2)
    wrong = _WrongDregRenyi(num_particles=k, alpha=alpha, estimator="dreg", max_plate_nesting=1)
    wrong.loss_and_grads(replicated_model, make_replicated_guide(), x)
    wrong_scale = param_grads(["scale"])["scale"]
    se = torch.sqrt(plain_scale.var(0) / replicates + wrong_scale.var(0) / replicates)
    assert ((plain_scale.mean(0) - wrong_scale.mean(0)).abs() > 4 * se).any()


def test_stl_is_biased_but_dreg_is_not_for_alpha_between_zero_and_one():
    """Check: stl is biased but dreg is not for alpha between zero and one."""
    replicates, k, alpha = 4000, 5, 0.5
    pyro.set_rng_seed(1)
    plain_loc, plain_scale = _replicated_grads("iwae", k, alpha, replicates)
    stl_loc, stl_scale = _replicated_grads("stl", k, alpha, replicates)
    se = torch.sqrt(plain_scale.var(0) / replicates + stl_scale.var(0) / replicates)
    assert ((plain_scale.mean(0) - stl_scale.mean(0)).abs() > 4 * se).any()


def test_invalid_alpha_raises():
    """Check: invalid alpha raises."""
    for alpha in (-0.5, float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            RenyiAlphaELBO(alpha=alpha)


def test_svi_training_reaches_the_exact_posterior(x):
    """Check: svi training reaches the exact posterior."""
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)
    loss = RenyiAlphaELBO(num_particles=5, alpha=0.5, estimator="dreg", max_plate_nesting=1)
    svi = pyro.infer.SVI(toy_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    for _ in range(300):
        svi.step(x, MU)
    store = pyro.get_param_store()
    torch.testing.assert_close(store.get_param("A"), torch.full((D,), 0.5), atol=0.08, rtol=0)
    torch.testing.assert_close(store.get_param("s"), torch.full((D,), 0.5**0.5), atol=0.08, rtol=0)


def test_trains_through_fit_and_elbo_module():
    """Check: trains through fit and elbo module."""
    from pyro_vi_ext import fit
    from tests.infer.test_conformance import N as FIT_N
    from tests.infer.test_conformance import guide as fit_guide
    from tests.infer.test_conformance import model as fit_model

    data = 1.5 * torch.randn(FIT_N, 3, generator=torch.Generator().manual_seed(0))
    loss = RenyiAlphaELBO(num_particles=4, alpha=0.5, estimator="dreg", max_plate_nesting=1)
    result = fit(fit_model, fit_guide, data, loss, pyro.optim.Adam({"lr": 0.05}), num_steps=40,
                 batch_size=4, seed=0, progress=False)  # fmt: skip
    assert result.stop_reason == "completed", result.message
    history = result.history["loss"]
    assert history[-10:].mean() < history[:10].mean()
    assert "renyi_bound" in result.history
    module = loss(fit_model, fit_guide)
    out = module(data)
    assert out.shape == () and out.requires_grad
