"""ImportanceWeightedELBO: gradients of the three estimators against ground truth.

* same random numbers: every estimator and variant equals a hand-written torch estimator;
* expectations: K=1 against the gradient of the closed-form ELBO, DReG against IWAE, a
  score-function (non-reparameterized) gradient against exact enumeration;
* the conformance of ``loss``, ``loss_and_grads`` and ``differentiable_loss``;
* the signal-to-noise ratio of the guide gradient as K grows.

Many tests use *per-point guide parameters with identical data*: the loss is a sum over data points
of per-point bounds, each depending only on its own parameters and particles, so the gradients of
the ``R`` per-point parameters are ``R`` independent replicates of one gradient estimate, all from
one vectorized call.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import RenyiELBO

from pyro_vi_ext import ImportanceWeightedELBO
from tests.infer.toy_models import (
    BERNOULLI_PRIOR,
    BERNOULLI_SHIFT,
    NonReparamNormal,
    bernoulli_exact_iwae_bound,
    bernoulli_model,
    make_bernoulli_guide,
    make_toy_guide,
    single_thread,  # noqa: F401 (a fixture)
    toy_closed_form_elbo,
    toy_data,
    toy_guide_params,
    toy_model,
)

D = 3
N = 10
MU = torch.tensor([0.5, -1.0, 2.0])
ESTIMATORS = ("iwae", "stl", "dreg")
VARIANTS = ("iwae", "ciwae", "piwae")
normal = torch.distributions.Normal


@pytest.fixture
def x():
    """Return the toy data set."""
    return toy_data(N, D, MU)


pytestmark = pytest.mark.usefixtures("single_thread")


def learned_mu_model(x, mu, batch_size=None):
    """Run the toy model with ``mu`` a model parameter (so that model gradients exist)."""
    toy_model(x, pyro.param("mu", mu.clone()), batch_size)


def param_grads(names) -> dict[str, torch.Tensor]:
    """Return the gradients of the named params (zeros where none)."""
    store = pyro.get_param_store()
    out = {}
    for name in names:
        grad = store.get_param(name).unconstrained().grad
        out[name] = torch.zeros_like(store.get_param(name)) if grad is None else grad.clone()
    return out


def zero_grads():
    """Reset the gradient of every param in the store."""
    for _, param in pyro.get_param_store().named_parameters():
        param.grad = None


def unconstrained(names) -> list[torch.Tensor]:
    """Return the unconstrained leaves of the named params."""
    store = pyro.get_param_store()
    return [store.get_param(name).unconstrained() for name in names]


# -- hand-written estimators on the same random numbers -------------------------------------------
def handwritten_toy_grads(x, idx, mu, a, b, log_s, eps, num_outer, k, estimator, variant, beta):
    """Compute the estimators directly in torch, as surrogates, without hooks.

    Guide gradient weights per particle on ``d log w_k / d z_k dz_k/dphi`` (plus, for "iwae", the
    score term through log q's parameters):
    iwae/stl: c_k = beta/K + (1 - beta) w~_k; dreg: c_k = beta/K + (1 - beta) w~_k^2 (beta = 0 for
    plain IWAE). Model gradient: sum_k c_k grad_theta log p with c_k = beta/K + (1 - beta) w~_k.
    """
    s = log_s.exp()
    xb = x[idx]
    loc = a * xb + b
    z = loc + s * eps
    scale_factor = x.shape[0] / xb.shape[0]

    def log_w(z, mu, loc, s):
        log_p = normal(mu, 1.0).log_prob(z).sum(-1) + normal(z, 1.0).log_prob(xb).sum(-1)
        return (log_p - normal(loc, s).log_prob(z).sum(-1)).reshape(num_outer, k, -1)

    def objective(lw):
        iwae = torch.logsumexp(lw, 1) - math.log(k)
        return beta * lw.mean(1) + (1 - beta) * iwae

    # model parameter: gradient of the objective through log p only
    model_surrogate = objective(log_w(z.detach(), mu, loc.detach(), s.detach()))
    if estimator == "iwae":
        guide_lw = log_w(z, mu.detach(), loc, s)
        guide_surrogate = objective(guide_lw)
    else:
        guide_lw = log_w(z, mu.detach(), loc.detach(), s.detach())
        normalized = torch.softmax(guide_lw.detach(), 1)
        power = 2 if estimator == "dreg" else 1
        weight = beta / k + (1 - beta) * normalized**power
        guide_surrogate = (weight * guide_lw).sum(1)
    total = scale_factor * (model_surrogate.mean(0).sum() + guide_surrogate.mean(0).sum())
    return torch.autograd.grad(-total, [mu, a, b, log_s])


@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("variant", ["iwae", "ciwae"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_equal_handwritten_estimators_on_the_same_draws(
    x, estimator, variant, batch_size
):
    """Check: gradients equal handwritten estimators on the same draws."""
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)
    num_outer, k, beta = 2, 5, 0.3
    loss = ImportanceWeightedELBO(
        num_particles=k,
        num_outer=num_outer,
        estimator=estimator,
        variant=variant,
        ciwae_beta=beta,
        max_plate_nesting=1,
    )
    torch.manual_seed(7)
    loss.loss_and_grads(learned_mu_model, guide, x, MU, batch_size)
    ours = param_grads(["mu", "A", "b", "s"])

    torch.manual_seed(7)
    idx = torch.randperm(N)[:batch_size] if batch_size else torch.arange(N)
    eps = torch.randn(num_outer * k, len(idx), D)
    leaves = [t.clone().requires_grad_() for t in (MU, init[0], init[1], init[2].log())]
    theirs = handwritten_toy_grads(
        x, idx, *leaves, eps, num_outer, k, estimator, variant, beta if variant == "ciwae" else 0.0
    )
    for (name, ours_grad), their_grad in zip(ours.items(), theirs, strict=True):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_piwae_splits_model_and_guide_gradients(x, estimator):
    """PIWAE: the model follows IWAE_{MK}, the guide MIWAE(M, K), on the same M K draws."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    num_outer, k = 3, 4
    kwargs = {"estimator": estimator, "max_plate_nesting": 1}
    names = ["mu", "A", "b", "s"]
    torch.manual_seed(1)
    value = ImportanceWeightedELBO(
        num_particles=k, num_outer=num_outer, variant="piwae", **kwargs
    ).loss_and_grads(learned_mu_model, guide, x, MU)
    piwae = param_grads(names)
    zero_grads()
    torch.manual_seed(1)
    iwae_mk_value = ImportanceWeightedELBO(num_particles=num_outer * k, **kwargs).loss_and_grads(
        learned_mu_model, guide, x, MU
    )
    iwae_mk = param_grads(names)
    zero_grads()
    torch.manual_seed(1)
    ImportanceWeightedELBO(num_particles=k, num_outer=num_outer, **kwargs).loss_and_grads(
        learned_mu_model, guide, x, MU
    )
    miwae = param_grads(names)
    assert value == pytest.approx(iwae_mk_value, rel=1e-6)
    torch.testing.assert_close(piwae["mu"], iwae_mk["mu"], rtol=1e-4, atol=1e-5)
    for name in ("A", "b", "s"):
        torch.testing.assert_close(piwae[name], miwae[name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(iwae_mk["A"], miwae["A"], rtol=1e-2)


# -- conformance of the three entry points -----------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_loss_loss_and_grads_and_differentiable_loss_agree(x, estimator, variant, batch_size):
    """Check: loss loss and grads and differentiable loss agree."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    loss = ImportanceWeightedELBO(
        num_particles=4, num_outer=2, estimator=estimator, variant=variant
    )
    loss.loss(learned_mu_model, guide, x, MU, batch_size)  # plate-nesting guess, params created
    names = ["mu", "A", "b", "s"]

    torch.manual_seed(3)
    value = loss.loss(learned_mu_model, guide, x, MU, batch_size)
    terms = dict(loss.last_terms)
    torch.manual_seed(3)
    differentiable = loss.differentiable_loss(learned_mu_model, guide, x, MU, batch_size)
    expected = torch.autograd.grad(differentiable, unconstrained(names))
    torch.manual_seed(3)
    zero_grads()
    value_with_grads = loss.loss_and_grads(learned_mu_model, guide, x, MU, batch_size)
    grads = param_grads(names)

    assert isinstance(value, float) and isinstance(value_with_grads, float)
    assert value == pytest.approx(float(differentiable.detach()), rel=1e-6)
    assert value_with_grads == pytest.approx(value, rel=1e-6)
    assert loss.last_terms == pytest.approx(terms, rel=1e-5)
    for name, grad in zip(names, expected, strict=True):
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert grad.abs().sum() > 0, name


# -- exact posterior: STL and DReG have zero guide gradient ----------------------------------------
@pytest.mark.parametrize("k", [1, 5, 50])
def test_exact_posterior_guide_gradient_is_zero_for_stl_and_dreg(x, k):
    """Check: exact posterior guide gradient is zero for stl and dreg."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=True))
    sizes = {}
    for estimator in ESTIMATORS:
        pyro.clear_param_store()
        loss = ImportanceWeightedELBO(num_particles=k, num_outer=2, estimator=estimator)
        loss.loss_and_grads(toy_model, guide, x, MU)
        grads = param_grads(["A", "b", "s"])
        sizes[estimator] = max(float(g.abs().max()) for g in grads.values())
    assert sizes["stl"] < 1e-4
    assert sizes["dreg"] < 1e-4
    assert sizes["iwae"] > 0.05  # the score term's noise, zero only in expectation


# -- expectations against ground truth ----------------------------------------------------------
def _grad_mean_se(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(samples).double()
    return stacked.mean(0), stacked.std(0) / math.sqrt(len(samples))


@pytest.mark.parametrize(
    "estimator, batch_size", [("iwae", None), ("stl", None), ("dreg", None), ("iwae", 5)]
)
def test_k1_expected_gradient_is_the_closed_form_elbo_gradient(x, estimator, batch_size):
    """Check: k1 expected gradient is the closed form elbo gradient.

    With K=1 every estimator is unbiased for the ELBO's gradient in (A, b, log s), also under
    subsampling (the minibatch gradient is scaled by N / B).
    """
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)
    leaves = [init[0].clone().requires_grad_(), init[1].clone().requires_grad_()]
    log_s = init[2].log().requires_grad_()
    elbo = toy_closed_form_elbo(x, MU, leaves[0], leaves[1], log_s.exp()).sum()
    truth = torch.autograd.grad(-elbo, [*leaves, log_s])

    loss = ImportanceWeightedELBO(
        num_particles=1, num_outer=20, estimator=estimator, max_plate_nesting=1
    )
    samples = {name: [] for name in "Abs"}
    for _ in range(100):
        zero_grads()
        loss.loss_and_grads(toy_model, guide, x, MU, batch_size)
        for name, grad in param_grads("Abs").items():
            samples[name].append(grad)
    for name, expected in zip("Abs", truth, strict=True):
        mean, se = _grad_mean_se(samples[name])
        assert ((mean - expected.double()).abs() < 4 * se).all(), (name, mean, expected, se)


# per-point guide for replicated gradients: loc_n, scale_n for R copies of the same x
R_D = 2
R_X = torch.tensor([1.0, -0.5])
R_POST = R_X / 2  # mu = 0


def replicated_model(x):
    """Toy model with a data plate of identical rows (one replicate per row)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(R_D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def make_replicated_guide(loc_offset=0.5, scale=0.9, distribution=dist.Normal):
    """Return a guide with per-row loc and scale params."""

    def guide(x):
        r = x.shape[0]
        loc = pyro.param("loc", (R_POST + loc_offset).expand(r, R_D).clone())
        s = pyro.param("scale", torch.full((r, R_D), scale), constraint=constraints.positive)
        with pyro.plate("data", r):
            pyro.sample("z", distribution(loc, s).to_event(1))

    return guide


def replicated_grads(estimator, k, replicates, variant="iwae", guide=None):
    """``[R, D]`` gradients of the per-point ``loc`` and unconstrained ``scale`` parameters."""
    pyro.clear_param_store()
    x = R_X.expand(replicates, R_D)
    loss = ImportanceWeightedELBO(
        num_particles=k, estimator=estimator, variant=variant, max_plate_nesting=1
    )
    loss.loss_and_grads(replicated_model, guide or make_replicated_guide(), x)
    grads = param_grads(["loc", "scale"])
    return grads["loc"], grads["scale"]


def _assert_same_mean(a: torch.Tensor, b: torch.Tensor, n_se: float = 4.0):
    se = torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])
    diff = (a.mean(0) - b.mean(0)).abs()
    assert (diff < n_se * se).all(), (a.mean(0), b.mean(0), se)


@pytest.mark.parametrize("variant", ["iwae", "ciwae"])
@pytest.mark.parametrize("k", [3, 20])
def test_dreg_and_iwae_gradients_have_the_same_expectation(k, variant):
    """Both are unbiased for the gradient of the same bound (IWAE_K or CIWAE_K)."""
    replicates = 4000
    pyro.set_rng_seed(0)
    iwae_loc, iwae_scale = replicated_grads("iwae", k, replicates, variant)
    dreg_loc, dreg_scale = replicated_grads("dreg", k, replicates, variant)
    _assert_same_mean(iwae_loc, dreg_loc)
    _assert_same_mean(iwae_scale, dreg_scale)
    # DReG is the lower-variance one
    assert (dreg_loc.var(0) < iwae_loc.var(0)).all()


def test_stl_is_biased_for_k_above_one():
    """Check: stl is biased for k above one.

    Documented bias (Tucker et al. 2018): as K grows the IWAE bound's gradient vanishes (DReG
    tends to 0), while STL's loc gradient tends to E_posterior[d(-log q)/dz] = (loc - m*) / s^2,
    here 0.5 / 0.81.
    """
    replicates, k = 2000, 200
    pyro.set_rng_seed(0)
    stl_loc, _ = replicated_grads("stl", k, replicates)
    dreg_loc, _ = replicated_grads("dreg", k, replicates)
    stl_mean, dreg_mean = stl_loc.mean(0), dreg_loc.mean(0)
    se = torch.sqrt(stl_loc.var(0) / replicates + dreg_loc.var(0) / replicates)
    assert ((stl_mean - dreg_mean).abs() > 20 * se).all()
    assert (dreg_mean.abs() < 0.02).all()
    torch.testing.assert_close(stl_mean, torch.full((R_D,), 0.5 / 0.81), rtol=0.05, atol=0.0)


# -- signal-to-noise ratio of the guide gradient --------------------------------------------------
def _snr(grads: torch.Tensor) -> float:
    """|mean| / std over replicates, averaged over coordinates."""
    return float((grads.mean(0).abs() / grads.std(0)).mean())


def test_guide_gradient_snr_rises_with_k_for_dreg_and_falls_for_iwae():
    """Check: guide gradient snr rises with k for dreg and falls for iwae.

    Rainforth et al. 2018: the IWAE guide-gradient SNR falls like K^{-1/2}; Tucker et al. 2018:
    DReG's rises like K^{1/2}. loc gradient of a wrong guide, 2000 replicates per K.
    """
    replicates = 2000
    pyro.set_rng_seed(0)
    snr = {
        (estimator, k): _snr(replicated_grads(estimator, k, replicates)[0])
        for estimator in ("iwae", "dreg")
        for k in (1, 10, 100)
    }
    assert snr["iwae", 1] > snr["iwae", 10] > snr["iwae", 100]
    assert snr["iwae", 100] < 0.5 * snr["iwae", 1]
    assert snr["dreg", 1] < snr["dreg", 10] < snr["dreg", 100]
    assert snr["dreg", 100] > 2 * snr["dreg", 1]


@pytest.mark.slow
def test_guide_gradient_snr_rates_in_k():
    """Check: guide gradient snr rates in k.

    Slow version: log-log slopes of SNR in K between K=10 and K=1000 near -1/2 (IWAE) and +1/2
    (DReG), from 20000 replicates.
    """
    replicates = 20000
    pyro.set_rng_seed(0)
    ks = (10, 100, 1000)
    snr = {
        (estimator, k): _snr(replicated_grads(estimator, k, replicates)[0])
        for estimator in ("iwae", "dreg")
        for k in ks
    }
    slope = {
        estimator: math.log(snr[estimator, ks[-1]] / snr[estimator, ks[0]])
        / math.log(ks[-1] / ks[0])
        for estimator in ("iwae", "dreg")
    }
    assert -0.8 < slope["iwae"] < -0.2, snr
    assert 0.35 < slope["dreg"] < 0.65, snr


# -- guide sites without rsample --------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_stl_and_dreg_reject_a_site_without_rsample(estimator):
    """Check: stl and dreg reject a site without rsample."""
    x = R_X.expand(5, R_D)
    loss = ImportanceWeightedELBO(num_particles=3, estimator=estimator)
    guide = make_replicated_guide(distribution=NonReparamNormal)
    with pytest.raises(ValueError, match=rf"Guide site 'z'.*'{estimator}' estimator"):
        loss.loss_and_grads(replicated_model, guide, x)
    xb = torch.tensor([0.3, -1.2, 0.8])
    with pytest.raises(ValueError, match=r"Guide site 'z' \(Bernoulli\) has no rsample"):
        loss.loss(bernoulli_model, make_bernoulli_guide(torch.zeros(3)), xb)


def test_score_function_gradient_matches_the_reparameterized_one():
    """Check: score function gradient matches the reparameterized one.

    A Normal guide without rsample gets a score-function gradient whose expectation is the
    reparameterized IWAE gradient's (both unbiased for the same bound's gradient).
    """
    replicates, k = 6000, 3
    pyro.set_rng_seed(0)
    reparam = replicated_grads("iwae", k, replicates, guide=make_replicated_guide(1.0, 0.6))
    score = replicated_grads(
        "iwae", k, replicates, guide=make_replicated_guide(1.0, 0.6, NonReparamNormal)
    )
    for reparam_grad, score_grad in zip(reparam, score, strict=True):
        _assert_same_mean(reparam_grad, score_grad)
        assert (score_grad.mean(0).abs() > 4 * score_grad.std(0) / math.sqrt(replicates)).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 3])
def test_bernoulli_latent_gradient_is_unbiased_against_enumeration(k, variant):
    """Check: bernoulli latent gradient is unbiased against enumeration.

    Discrete latent: the IWAE bound and its gradient are computed exactly by enumerating all
    2^K particle tuples; our score-function (VIMCO) gradient is unbiased for it (per-point logits,
    identical data: independent replicates).
    """
    replicates = 4000
    x_value, logit = 0.4, -2.5
    x = torch.full((replicates,), x_value)
    guide = make_bernoulli_guide(torch.full((replicates,), logit))
    num_outer = 2 if variant == "piwae" else 1
    loss = ImportanceWeightedELBO(
        num_particles=k, num_outer=num_outer, variant=variant, max_plate_nesting=1
    )
    pyro.set_rng_seed(0)
    value = loss.loss_and_grads(bernoulli_model, guide, x)
    grads = param_grads(["logits"])["logits"]

    leaf = torch.tensor([logit], requires_grad=True)
    exact_k = k * num_outer if variant == "piwae" else k
    exact_bound = bernoulli_exact_iwae_bound(torch.tensor([x_value]), leaf, exact_k)
    if variant == "ciwae":  # 0.5 ELBO + 0.5 IWAE_K
        elbo = bernoulli_exact_iwae_bound(torch.tensor([x_value]), leaf, 1)
        exact_bound = 0.5 * elbo + 0.5 * exact_bound
    # PIWAE's value is IWAE_{MK}, but its guide gradient follows MIWAE(M, K) = E[IWAE_K]
    guide_bound = bernoulli_exact_iwae_bound(torch.tensor([x_value]), leaf, k)
    if variant == "ciwae":
        guide_bound = exact_bound
    (exact_grad,) = torch.autograd.grad(-guide_bound.sum(), leaf)

    se = float(grads.std() / math.sqrt(replicates))
    assert abs(float(grads.mean()) - float(exact_grad)) < 4 * se
    assert abs(float(exact_grad)) > 8 * se  # a real, nonzero gradient
    # the value: mean over the replicated points of the bound. A per-point value is a (weighted)
    # mean of the two possible log-weights, so its standard deviation is at most half their range.
    log_w = torch.stack(
        [
            math.log(1 - BERNOULLI_PRIOR)
            + normal(-1.0, 1.0).log_prob(torch.tensor(x_value))
            - torch.nn.functional.logsigmoid(torch.tensor(-logit)),
            math.log(BERNOULLI_PRIOR)
            + normal(BERNOULLI_SHIFT - 1.0, 1.0).log_prob(torch.tensor(x_value))
            - torch.nn.functional.logsigmoid(torch.tensor(logit)),
        ]
    )
    max_se = float(log_w.max() - log_w.min()) / 2 / math.sqrt(replicates)
    assert abs(-value / replicates - float(exact_bound.detach())) < 4 * max_se


def test_pyro_renyi_elbo_gives_a_non_reparameterized_site_zero_gradient():
    """Check: pyro renyi elbo gives a non reparameterized site zero gradient.

    Documents Pyro's defect: RenyiELBO(alpha=0) drops the score-function term of a guide site
    without rsample, so its parameters get exactly zero gradient (ours does not: previous test).
    """
    replicates = 50
    x = torch.full((replicates,), 0.4)
    guide = make_bernoulli_guide(torch.full((replicates,), -0.3))
    renyi = RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    renyi.loss_and_grads(bernoulli_model, guide, x)
    grad = pyro.get_param_store().get_param("logits").unconstrained().grad
    assert grad is None or torch.all(grad == 0)
    zero_grads()
    ImportanceWeightedELBO(num_particles=3).loss_and_grads(bernoulli_model, guide, x)
    assert param_grads(["logits"])["logits"].abs().sum() > 0


# -- a two-level guide: the path derivative runs through z1 into z2 --------------------------------
def hierarchical_model(x):
    """Two-level model: a group latent and per-point latents."""
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


def hierarchical_guide(x):
    """Guide for the two-level model."""
    a = pyro.param("a", torch.tensor(0.3))
    s1 = pyro.param("s1", torch.tensor(0.7), constraint=constraints.positive)
    c = pyro.param("c", torch.tensor(0.4))
    d = pyro.param("d", torch.tensor(-0.2))
    s2 = pyro.param("s2", torch.tensor(0.6), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(a + 0.5 * x, s1))
        pyro.sample("z2", dist.Normal(c * z1 + d, s2))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_level_guide_gradients_equal_handwritten_on_the_same_draws(estimator):
    """Check: two level guide gradients equal handwritten on the same draws."""
    x = torch.tensor([0.5, -1.0, 2.0, 0.1])
    k = 6
    loss = ImportanceWeightedELBO(num_particles=k, estimator=estimator, max_plate_nesting=1)
    names = ["a", "s1", "c", "d", "s2"]
    torch.manual_seed(8)
    loss.loss_and_grads(hierarchical_model, hierarchical_guide, x)
    ours = param_grads(names)

    torch.manual_seed(8)
    e1 = torch.randn(k, 4)
    e2 = torch.randn(k, 4)
    a, c, d = (torch.tensor(v, requires_grad=True) for v in (0.3, 0.4, -0.2))
    u1, u2 = (torch.tensor(v).log().requires_grad_() for v in (0.7, 0.6))
    leaves = [a, u1, c, d, u2]

    def log_q(a, s1, c, d, s2, z1, z2):
        return normal(a + 0.5 * x, s1).log_prob(z1) + normal(c * z1 + d, s2).log_prob(z2)

    s1, s2 = u1.exp(), u2.exp()
    z1 = a + 0.5 * x + s1 * e1
    z2 = c * z1 + d + s2 * e2
    log_p = normal(0.0, 1.0).log_prob(z1) + normal(z1, 1.0).log_prob(z2)
    log_p = log_p + normal(z2, 1.0).log_prob(x)
    if estimator == "iwae":
        lw = log_p - log_q(a, s1, c, d, s2, z1, z2)
    else:
        detached = [t.detach() for t in (a, s1, c, d, s2)]
        lw = log_p - log_q(*detached, z1, z2)
    if estimator == "dreg":
        surrogate = (torch.softmax(lw.detach(), 0) ** 2 * lw).sum(0).sum()
    else:
        surrogate = (torch.logsumexp(lw, 0) - math.log(k)).sum()
    theirs = torch.autograd.grad(-surrogate, leaves)
    for name, grad in zip(names, theirs, strict=True):
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_stl_rejects_a_guide_tensor_not_registered_with_pyro():
    """Check: stl rejects a guide tensor not registered with pyro.

    A trainable tensor the guide closes over cannot be detached: clear error, not a silent
    score term left in the STL/DReG gradient.
    """
    hidden = torch.tensor(0.3, requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(hidden * x, 1.0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.tensor([0.5, -1.0])
    with pytest.raises(ValueError, match="Guide site 'z'.*still depends on parameters"):
        ImportanceWeightedELBO(num_particles=2, estimator="stl").loss_and_grads(model, guide, x)
