"""ClosedFormELBO: the entropy and analytic-KL forms of the ELBO against ground truth.

* same random numbers: both forms equal a hand-written torch estimate on the guide's own draws,
  values and gradients, with and without subsampling and with a site-specific user scale;
* expectations: the value is the ELBO (as for ``Trace_ELBO``) and the gradient is the gradient of
  the closed-form ELBO of the linear-Gaussian toy, within standard errors;
* errors name the site whose closed form is missing.

Unbiasedness uses per-point guide parameters on identical data (as in the IWAE gradient tests):
point ``n``'s parameters get only point ``n``'s gradient, so one vectorized call gives ``R``
independent replicates of one gradient estimate.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO

from pyro_vi_ext import ClosedFormELBO
from pyro_vi_ext.infer._weights import particle_plate
from tests.infer.toy_models import (
    NonReparamNormal,
    make_toy_guide,
    single_thread,  # noqa: F401 (a fixture)
    toy_closed_form_elbo,
    toy_data,
    toy_guide_params,
    toy_model,
)

D = 3
N = 6
MU = torch.tensor([0.5, -1.0, 2.0])
FORMS = ("entropy", "kl")
normal = torch.distributions.Normal
HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def x():
    """Toy data drawn from the evidence N(mu, 2 I)."""
    return toy_data(N, D, MU)


def _params():
    a, b, s = (pyro.param(name) for name in ("A", "b", "s"))
    return a, b, s, [a, b, s.unconstrained()]


def _hand_estimate(form, x, a, b, s, z, subsample_factor=1.0, prior_scale=1.0):
    """Write the estimator out: draws z = m + s * eps with eps recovered from the guide's z."""
    m = a * x + b
    eps = ((z - m) / s).detach()
    z = m + s * eps  # the same values, differentiable in (A, b, s) as the guide's were
    log_lik = normal(z, 1.0).log_prob(x).sum(-1)  # [K, B]
    if form == "entropy":
        log_prior = normal(MU, 1.0).log_prob(z).sum(-1)
        entropy = (torch.log(s) + HALF_LOG_2PI_E).sum() * torch.ones(x.shape[0])
        per_point = (prior_scale * log_prior + log_lik).mean(0) + prior_scale * entropy
    else:
        kl = (-torch.log(s) + 0.5 * (s**2 + (m - MU) ** 2) - 0.5).sum(-1)
        per_point = log_lik.mean(0) - prior_scale * kl
    return subsample_factor * per_point.sum()


def _guide_draws(guide, num_particles, *args):
    trace = poutine.trace(particle_plate(num_particles, 1)(guide)).get_trace(*args)
    return trace


@pytest.mark.parametrize("form", FORMS)
def test_same_draws_value_and_gradients(form, x):
    """On the guide's own draws the loss is the hand-written estimate, value and gradients."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    loss = ClosedFormELBO(form=form, num_particles=7, max_plate_nesting=1)
    pyro.set_rng_seed(11)
    value = loss.differentiable_loss(toy_model, guide, x, MU)
    a, b, s, leaves = _params()
    grads = torch.autograd.grad(value, leaves)
    pyro.set_rng_seed(11)
    z = _guide_draws(guide, 7, x, MU).nodes["z"]["value"]
    expected = -_hand_estimate(form, x, a, b, s, z)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    assert loss.last_terms["elbo"] == pytest.approx(-float(value.detach()) / N, rel=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_subsampled_minibatch_is_scaled_after_the_per_point_terms(form):
    """A minibatch of B of N points is scaled by N / B."""
    x = toy_data(12, D, MU, seed=3)
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    loss = ClosedFormELBO(form=form, num_particles=5, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    value = loss.differentiable_loss(toy_model, guide, x, MU, 4)
    pyro.set_rng_seed(5)
    trace = _guide_draws(guide, 5, x, MU, 4)
    idx, z = trace.nodes["data"]["value"], trace.nodes["z"]["value"]
    a, b, s, _ = _params()
    expected = -_hand_estimate(form, x[idx], a, b, s, z, subsample_factor=3.0)
    torch.testing.assert_close(value, expected)


def _annealed_model(x, mu, beta):
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=beta):
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _make_annealed_guide(init):
    a0, b0, s0 = init

    def guide(x, mu, beta):
        a = pyro.param("A", a0.clone())
        b = pyro.param("b", b0.clone())
        s = pyro.param("s", s0.clone(), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=beta):
            pyro.sample("z", dist.Normal(a * x + b, s).to_event(1))

    return guide


@pytest.mark.parametrize("form", FORMS)
def test_site_specific_user_scale_weights_the_latent_terms(form, x):
    """KL annealing (poutine.scale on z only) weights the latent's terms by beta."""
    # KL annealing: the latent's prior and guide terms carry beta, the likelihood does not
    beta = 0.3
    guide = _make_annealed_guide(toy_guide_params(D, MU, exact=False))
    loss = ClosedFormELBO(form=form, num_particles=4, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    value = loss.differentiable_loss(_annealed_model, guide, x, MU, beta)
    pyro.set_rng_seed(2)
    z = _guide_draws(guide, 4, x, MU, beta).nodes["z"]["value"]
    a, b, s, _ = _params()
    torch.testing.assert_close(value, -_hand_estimate(form, x, a, b, s, z, prior_scale=beta))


def _per_point_guide(init, replicates):
    a0, b0, s0 = (t.expand(replicates, D).clone() for t in init)

    def guide(x, mu, batch_size=None, scale=1.0):
        a = pyro.param("A", a0)
        b = pyro.param("b", b0)
        s = pyro.param("s", s0, constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * x + b, s).to_event(1))

    return guide


@pytest.mark.parametrize("form", FORMS)
def test_gradient_is_unbiased_for_the_closed_form_gradient(form):
    """Mean of 4,000 gradient replicates equals the closed-form ELBO's gradient."""
    replicates = 4000
    init = toy_guide_params(D, MU, exact=False)
    x0 = toy_data(1, D, MU, seed=7)
    x = x0.expand(replicates, D)
    guide = _per_point_guide(init, replicates)
    loss = ClosedFormELBO(form=form, num_particles=1, max_plate_nesting=1)
    value = loss.differentiable_loss(toy_model, guide, x, MU)
    _, _, _, leaves = _params()
    grads = torch.autograd.grad(-value, leaves)  # each [R, D]: R independent replicates

    a, b, log_s = (t.clone().requires_grad_(True) for t in (init[0], init[1], init[2].log()))
    exact = torch.autograd.grad(
        toy_closed_form_elbo(x0, MU, a, b, log_s.exp()).sum(), (a, b, log_s)
    )
    for grad, expected in zip(grads, exact, strict=True):
        mean, se = grad.mean(0), grad.std(0) / math.sqrt(replicates)
        assert torch.all((mean - expected).abs() <= 4 * se + 1e-6), (form, mean, expected, se)


@pytest.mark.parametrize("form", FORMS)
def test_value_is_the_elbo_in_expectation_like_trace_elbo(form, x):
    """Both our value and Trace_ELBO's average to the closed-form ELBO."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    ours = ClosedFormELBO(form=form, num_particles=10, max_plate_nesting=1)
    reference = Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1)
    repeats = 200
    ours_values = torch.tensor([ours.loss(toy_model, guide, x, MU) for _ in range(repeats)])
    reference_values = torch.tensor(
        [reference.loss(toy_model, guide, x, MU) for _ in range(repeats)]
    )
    a, b, s, _ = _params()
    with torch.no_grad():
        exact = -float(toy_closed_form_elbo(x, MU, a, b, s).sum())
    for values in (ours_values, reference_values):
        se = float(values.std()) / math.sqrt(repeats)
        assert abs(float(values.mean()) - exact) <= 4 * se, (form, float(values.mean()), exact, se)


def test_entropy_form_has_trace_elbo_gradient_for_a_gaussian_guide(x):
    """For a Gaussian guide the entropy form's gradient is Trace_ELBO's, draw by draw."""
    # for q = N(m, s^2) reparameterized, d/dphi [-log q(m + s eps)] = d/dphi H[q] exactly: the
    # closed-form entropy changes the value's noise, not the gradient
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    pyro.set_rng_seed(8)
    ours = ClosedFormELBO(form="entropy", num_particles=6, max_plate_nesting=1)
    value = ours.differentiable_loss(toy_model, guide, x, MU)
    _, _, _, leaves = _params()
    grads = torch.autograd.grad(value, leaves)
    pyro.set_rng_seed(8)
    reference = Trace_ELBO(num_particles=6, vectorize_particles=True, max_plate_nesting=1)
    reference_value = reference.differentiable_loss(toy_model, guide, x, MU)
    reference_grads = torch.autograd.grad(reference_value, leaves)
    for grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, expected)
    assert not torch.isclose(value, reference_value)  # the values differ: only the noise of H


def test_loss_and_grads_and_svi_agree_with_differentiable_loss(x):
    """loss, loss_and_grads and SVI follow differentiable_loss."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    loss = ClosedFormELBO(form="kl", num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    value = loss.differentiable_loss(toy_model, guide, x, MU)
    _, _, _, leaves = _params()
    grads = torch.autograd.grad(value, leaves)
    pyro.set_rng_seed(4)
    assert loss.loss(toy_model, guide, x, MU) == pytest.approx(float(value.detach()), rel=1e-6)
    pyro.set_rng_seed(4)
    assert loss.loss_and_grads(toy_model, guide, x, MU) == pytest.approx(
        float(value.detach()), rel=1e-6
    )
    for leaf, grad in zip(leaves, grads, strict=True):
        torch.testing.assert_close(leaf.grad, grad)
        leaf.grad = None
    svi = SVI(toy_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    first = svi.step(x, MU)
    for _ in range(100):
        last = svi.step(x, MU)
    assert last < first
    assert set(loss.last_terms) == {"elbo", "kl"}


def test_guide_site_without_rsample_is_refused(x):
    """A guide site without rsample is refused with its name."""

    def guide(x, mu):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", NonReparamNormal(x / 2, 0.7).to_event(1))

    with pytest.raises(ValueError, match="Guide site 'z' .*has no rsample"):
        ClosedFormELBO(form="kl", max_plate_nesting=1).loss(toy_model, guide, x, MU)


def test_missing_entropy_names_the_site(x):
    """A guide distribution without closed-form entropy is refused with its name."""

    def guide(x, mu):
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(x / 2, 0.7)
            pyro.sample(
                "z",
                dist.TransformedDistribution(
                    base, [dist.transforms.AffineTransform(0.0, 1.0)]
                ).to_event(1),
            )

    with pytest.raises(ValueError, match="Guide site 'z' .*no closed-form entropy"):
        ClosedFormELBO(form="entropy", max_plate_nesting=1).loss(toy_model, guide, x, MU)


def test_missing_kl_names_the_site_and_the_pair(x):
    """A guide/prior pair without registered KL is refused with both names."""

    def heavy_model(x, mu):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.StudentT(3.0, mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    with pytest.raises(ValueError, match="Latent site 'z'.*Independent.*Independent"):
        ClosedFormELBO(form="kl", max_plate_nesting=1).loss(heavy_model, guide, x, MU)
    # the entropy form needs no KL: it runs
    assert math.isfinite(
        ClosedFormELBO(form="entropy", max_plate_nesting=1).loss(heavy_model, guide, x, MU)
    )


def test_invalid_form():
    """An unknown form is refused."""
    with pytest.raises(ValueError, match="form must be one of"):
        ClosedFormELBO(form="analytic")


# -- the known variance orderings on the toy (bench/bench_gradient_variance.py) -------------------
def _variance(state, label, repeats=100):
    from bench.bench_gradient_variance import estimators, gradient_variance, toy_problem

    problem = toy_problem(state)
    make_loss, score = next(
        (make, score) for name, make, score in estimators((1, 10)) if name == label
    )
    pyro.set_rng_seed(0)
    guide = problem.score_guide if score else problem.guide
    return gradient_variance(problem, make_loss(), guide, repeats, label)


def test_reparameterized_gradient_is_below_score_function():
    """Reparameterized MC is far less noisy than the score function."""
    reparam = _variance("mis-fit guide", "reparam MC")
    score = _variance("mis-fit guide", "score function")
    # the trace of the covariance estimated from 100 draws is within ~30%: a factor 5 is safe
    assert reparam.trace_covariance["guide"] * 5 < score.trace_covariance["guide"]


def test_stl_and_dreg_have_zero_variance_at_the_exact_posterior():
    """STL and DReG have exactly zero guide-gradient variance at the posterior."""
    reparam = _variance("exact posterior", "reparam MC")
    assert reparam.trace_covariance["guide"] > 1.0
    for label in ("STL K=1", "DREG K=10"):
        row = _variance("exact posterior", label)
        assert row.trace_covariance["guide"] < 1e-8, label


def test_closed_form_entropy_lowers_the_value_variance_only_away_from_the_posterior():
    """The entropy form lowers the value's variance only where -log q is noisy."""
    # under-dispersed guide: -log q carries the noise, which the closed form removes
    entropy = _variance("under-dispersed guide", "closed-form entropy")
    reparam = _variance("under-dispersed guide", "reparam MC")
    assert entropy.value_variance * 100 < reparam.value_variance
    # the gradients are the same draw by draw for a Gaussian guide
    assert entropy.trace_covariance["guide"] == pytest.approx(reparam.trace_covariance["guide"])
    # at the exact posterior log w is constant and the closed form adds noise instead
    entropy = _variance("exact posterior", "closed-form entropy")
    reparam = _variance("exact posterior", "reparam MC")
    assert reparam.value_variance < 1e-6 < 1.0 < entropy.value_variance


def test_closed_form_kl_lowers_the_gradient_variance_of_a_misfit_guide():
    """The analytic KL lowers the gradient variance of a mis-fit guide."""
    kl = _variance("mis-fit guide", "closed-form KL")
    reparam = _variance("mis-fit guide", "reparam MC")
    assert kl.trace_covariance["guide"] * 2 < reparam.trace_covariance["guide"]
