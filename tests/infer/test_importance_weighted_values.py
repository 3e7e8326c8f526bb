"""ImportanceWeightedELBO: the value of the bound against closed forms and independent computations.

Toy of the field notes: z ~ N(mu, I_D), x | z ~ N(z, I_D), guide N(A x + b, s^2) per data point.
Statistical checks use fixed seeds and tolerances of a few standard errors.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_vi_ext import ImportanceWeightedELBO
from tests.infer.toy_models import (
    global_log_evidence,
    global_log_joint,
    global_model,
    global_posterior,
    make_global_guide,
    make_toy_guide,
    single_thread,  # noqa: F401 (a fixture)
    toy_closed_form_elbo,
    toy_data,
    toy_guide_params,
    toy_log_evidence,
    toy_model,
)

D = 3
N = 10
MU = torch.tensor([0.5, -1.0, 2.0])
ESTIMATORS = ("iwae", "stl", "dreg")
VARIANTS = ("iwae", "ciwae", "piwae")


@pytest.fixture
def x():
    """Return the toy data set."""
    return toy_data(N, D, MU)


pytestmark = pytest.mark.usefixtures("single_thread")


def _mean_se(values) -> tuple[float, float]:
    values = torch.as_tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def _independent_toy_bound(x, init, num_outer, k, eps, *, beta_latent=1.0, ciwae_beta=None):
    """``sum_n mean_m LME_k(log w)`` written directly in torch, from standard normal draws ``eps``.

    ``eps`` is ``[M * K, N, D]`` in the particle order of the loss (outer draw major).
    """
    a, b, s = init
    z = a * x + b + s * eps
    normal = torch.distributions.Normal
    log_lik = normal(z, 1.0).log_prob(x).sum(-1)
    log_prior = normal(MU, 1.0).log_prob(z).sum(-1)
    log_q = normal(a * x + b, s).log_prob(z).sum(-1)
    lw = (log_lik + beta_latent * (log_prior - log_q)).reshape(num_outer, k, -1)
    iwae = torch.logsumexp(lw, 1) - math.log(k)
    if ciwae_beta is not None:
        iwae = ciwae_beta * lw.mean(1) + (1 - ciwae_beta) * iwae
    return iwae.mean(0).sum()


# -- the exact posterior --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("k", [1, 5, 50])
def test_exact_posterior_loss_is_minus_log_evidence(x, estimator, variant, k):
    """Check: exact posterior loss is minus log evidence."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=True))
    loss = ImportanceWeightedELBO(
        num_particles=k, num_outer=2, estimator=estimator, variant=variant
    )
    target = -float(toy_log_evidence(x, MU).sum())
    assert loss.loss(toy_model, guide, x, MU) == pytest.approx(target, rel=1e-5, abs=1e-4)
    value = loss.differentiable_loss(toy_model, guide, x, MU).detach()
    assert float(value) == pytest.approx(target, rel=1e-5, abs=1e-4)
    assert loss.loss_and_grads(toy_model, guide, x, MU) == pytest.approx(target, rel=1e-5, abs=1e-4)
    # every log-weight equals log p(x_n): ESS is K and the ELBO equals the bound
    assert loss.last_terms["ess"] == pytest.approx(k, rel=1e-4)
    assert loss.last_terms["elbo"] == pytest.approx(loss.last_terms["iw_bound"], abs=1e-4)
    assert loss.last_terms["iw_bound"] == pytest.approx(-target / N, rel=1e-5)


# -- a wrong guide: same random numbers as an independent torch computation ------------------------
@pytest.mark.parametrize("variant", ["iwae", "ciwae"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("k", [1, 7])
def test_value_equals_independent_computation_on_the_same_draws(x, estimator, variant, k):
    """Check: value equals independent computation on the same draws."""
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)
    num_outer = 3
    loss = ImportanceWeightedELBO(
        num_particles=k,
        num_outer=num_outer,
        estimator=estimator,
        variant=variant,
        ciwae_beta=0.3,
        max_plate_nesting=1,  # no plate-guessing run: the first draws are the guide's
    )
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        torch.manual_seed(123)
        value = float(torch.as_tensor(getattr(loss, method)(toy_model, guide, x, MU)).detach())
        torch.manual_seed(123)
        eps = torch.randn(num_outer * k, N, D)
        expected = _independent_toy_bound(
            x, init, num_outer, k, eps, ciwae_beta=0.3 if variant == "ciwae" else None
        )
        assert value == pytest.approx(-float(expected), rel=1e-5), method


def test_piwae_value_is_the_bound_with_all_particles(x):
    """PIWAE's value is IWAE_{M K} on the same M K draws."""
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)
    loss = ImportanceWeightedELBO(
        num_particles=4, num_outer=3, variant="piwae", max_plate_nesting=1
    )
    torch.manual_seed(5)
    value = loss.loss(toy_model, guide, x, MU)
    torch.manual_seed(5)
    expected = _independent_toy_bound(x, init, 1, 12, torch.randn(12, N, D))
    assert value == pytest.approx(-float(expected), rel=1e-5)


def test_bound_gap_shrinks_monotonically_with_k(x):
    """E[IWAE_K] increases with K toward log p(x); IWAE_1 has the closed-form ELBO as mean."""
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)
    log_evidence = float(toy_log_evidence(x, MU).sum())
    closed_elbo = float(toy_closed_form_elbo(x, MU, *init).sum())
    replicates = 20
    means, ses = {}, {}
    for k, num_outer in ((1, 100), (3, 100), (10, 100), (50, 50), (200, 25)):
        loss = ImportanceWeightedELBO(num_particles=k, num_outer=num_outer, max_plate_nesting=1)
        bounds = [-loss.loss(toy_model, guide, x, MU) for _ in range(replicates)]
        means[k], ses[k] = _mean_se(bounds)
    ks = sorted(means)
    assert abs(means[1] - closed_elbo) < 4 * ses[1]
    for k_small, k_large in zip(ks[:-1], ks[1:], strict=True):
        diff_se = math.hypot(ses[k_small], ses[k_large])
        assert means[k_large] - means[k_small] > 4 * diff_se, (k_small, k_large, means)
    for k in ks:
        assert means[k] < log_evidence + 4 * ses[k]
    # the gap at K=200 is a small fraction of the ELBO's gap
    assert log_evidence - means[200] < 0.1 * (log_evidence - closed_elbo)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_k1_matches_trace_elbo_in_expectation(x, batch_size):
    """Check: k1 matches trace elbo in expectation."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    ours = ImportanceWeightedELBO(num_particles=1, num_outer=50, max_plate_nesting=1)
    theirs = Trace_ELBO(num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    ours_mean, ours_se = _mean_se(
        [ours.loss(toy_model, guide, x, MU, batch_size) for _ in range(40)]
    )
    theirs_mean, theirs_se = _mean_se(
        [theirs.loss(toy_model, guide, x, MU, batch_size) for _ in range(40)]
    )
    assert abs(ours_mean - theirs_mean) < 4 * math.hypot(ours_se, theirs_se)


def test_k1_equals_elbo_on_the_same_draw(x):
    """With K=1 the bound is the single-sample ELBO on the same draws: last_terms agree."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    loss = ImportanceWeightedELBO(num_particles=1, num_outer=4, max_plate_nesting=1)
    loss.loss(toy_model, guide, x, MU)
    assert loss.last_terms["elbo"] == pytest.approx(loss.last_terms["iw_bound"], rel=1e-6)
    assert loss.last_terms["ess"] == pytest.approx(1.0)


# -- subsampling -----------------------------------------------------------------------------------
SUB_N, SUB_D, SUB_B, SUB_K = 20, 2, 5, 10
SUB_MU = torch.tensor([0.5, -1.0])


def _full_data_expected_bound(x, init, k, num_draws=4000, beta_latent=1.0):
    """``sum_n E[IWAE_K(x_n)]`` by plain Monte Carlo in torch, with its standard error."""
    generator = torch.Generator().manual_seed(99)
    a, b, s = init
    eps = torch.randn(num_draws, k, x.shape[0], x.shape[1], generator=generator)
    z = a * x + b + s * eps
    normal = torch.distributions.Normal
    lw = normal(z, 1.0).log_prob(x).sum(-1) + beta_latent * (
        normal(SUB_MU, 1.0).log_prob(z).sum(-1) - normal(a * x + b, s).log_prob(z).sum(-1)
    )
    per_point = torch.logsumexp(lw, 1) - math.log(k)  # [draws, N]
    total = per_point.sum(-1).double()
    return float(total.mean()), float(total.std() / math.sqrt(num_draws))


def _scaled(fn, scale):
    def wrapped(*args, **kwargs):
        with poutine.scale(scale=scale):
            return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("user_scale", [1.0, 0.25])
def test_minibatch_loss_is_unbiased_for_the_full_data_bound(user_scale):
    """Check: minibatch loss is unbiased for the full data bound."""
    x = toy_data(SUB_N, SUB_D, SUB_MU, seed=1)
    init = toy_guide_params(SUB_D, SUB_MU, exact=False)
    model, guide = _scaled(toy_model, user_scale), _scaled(make_toy_guide(init), user_scale)
    target, target_se = _full_data_expected_bound(x, init, SUB_K)
    loss = ImportanceWeightedELBO(num_particles=SUB_K, num_outer=20, max_plate_nesting=1)
    # the full-data call agrees with the independent expectation (no subsampling)
    full_mean, full_se = _mean_se([-loss.loss(model, guide, x, SUB_MU) for _ in range(10)])
    assert abs(full_mean - user_scale * target) < 4 * math.hypot(full_se, user_scale * target_se)
    minibatch = [-loss.loss(model, guide, x, SUB_MU, SUB_B) for _ in range(200)]
    mean, se = _mean_se(minibatch)
    assert abs(mean - user_scale * target) < 4 * math.hypot(se, user_scale * target_se)
    # iw_bound is per data point, user scale included
    assert loss.last_terms["iw_bound"] == pytest.approx(minibatch[-1] / SUB_N, rel=1e-5)


def test_site_specific_user_scale_tempers_the_log_weights():
    """Check: site specific user scale tempers the log weights.

    A scale on the latent sites only (KL annealing) multiplies their log-densities inside the
    log-weights, and subsampling is still applied after the log-mean-exp.
    """
    beta = 0.3
    x = toy_data(SUB_N, SUB_D, SUB_MU, seed=2)
    init = toy_guide_params(SUB_D, SUB_MU, exact=False)
    a, b, s = init

    def model(x, mu, batch_size=None):
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])

    def guide(x, mu, batch_size=None):
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            with poutine.scale(scale=beta):
                pyro.sample("z", dist.Normal(a * x[idx] + b, s).to_event(1))

    loss = ImportanceWeightedELBO(num_particles=SUB_K, num_outer=2, max_plate_nesting=1)
    torch.manual_seed(3)
    value = loss.loss(model, guide, x, SUB_MU)
    torch.manual_seed(3)
    eps = torch.randn(2 * SUB_K, SUB_N, SUB_D)
    z = a * x + b + s * eps
    normal = torch.distributions.Normal
    lw = normal(z, 1.0).log_prob(x).sum(-1) + beta * (
        normal(SUB_MU, 1.0).log_prob(z).sum(-1) - normal(a * x + b, s).log_prob(z).sum(-1)
    )
    expected = (torch.logsumexp(lw.reshape(2, SUB_K, -1), 1) - math.log(SUB_K)).mean(0).sum()
    assert value == pytest.approx(-float(expected), rel=1e-5)

    target, target_se = _full_data_expected_bound(x, init, SUB_K, beta_latent=beta)
    loss = ImportanceWeightedELBO(num_particles=SUB_K, num_outer=20, max_plate_nesting=1)
    mean, se = _mean_se([-loss.loss(model, guide, x, SUB_MU, SUB_B) for _ in range(200)])
    assert abs(mean - target) < 4 * math.hypot(se, target_se)


def test_pyro_renyi_elbo_is_biased_under_subsampling():
    """Check: pyro renyi elbo is biased under subsampling.

    Documents Pyro's defect: RenyiELBO(alpha=0) computes sum_b LME_k(s * lw) with s = N / B
    instead of s * sum_b LME_k(lw), so its minibatch mean misses the full-data bound by many SE
    (ours, same setting, is unbiased: previous test).
    """
    x = toy_data(SUB_N, SUB_D, SUB_MU, seed=1)
    init = toy_guide_params(SUB_D, SUB_MU, exact=False)
    guide = make_toy_guide(init)
    target, target_se = _full_data_expected_bound(x, init, SUB_K)
    renyi = RenyiELBO(alpha=0, num_particles=SUB_K, vectorize_particles=True, max_plate_nesting=1)
    # without subsampling RenyiELBO(alpha=0) is a correct per-point IWAE
    full_mean, full_se = _mean_se([-renyi.loss(toy_model, guide, x, SUB_MU) for _ in range(100)])
    assert abs(full_mean - target) < 4 * math.hypot(full_se, target_se)
    mean, se = _mean_se([-renyi.loss(toy_model, guide, x, SUB_MU, SUB_B) for _ in range(200)])
    assert mean - target > 10 * math.hypot(se, target_se)  # overestimates the bound


# -- global latents ------------------------------------------------------------------------------
GLOBAL_N = 8


def test_global_latent_exact_posterior_gives_log_evidence():
    """Check: global latent exact posterior gives log evidence."""
    x = toy_data(GLOBAL_N, 1, torch.zeros(1), seed=4).squeeze(-1)
    guide = make_global_guide(*global_posterior(x))
    target = -float(global_log_evidence(x))
    for k in (1, 5, 50):
        loss = ImportanceWeightedELBO(num_particles=k)
        assert loss.loss(global_model, guide, x) == pytest.approx(target, rel=1e-5)


@pytest.mark.parametrize("k", [1, 6])
def test_global_latent_gets_the_whole_trace_bound(k):
    """Check: global latent gets the whole trace bound."""
    x = toy_data(GLOBAL_N, 1, torch.zeros(1), seed=4).squeeze(-1)
    loc, scale = 0.8, 0.9
    guide = make_global_guide(loc, scale)
    num_outer = 3
    loss = ImportanceWeightedELBO(num_particles=k, num_outer=num_outer, max_plate_nesting=1)
    torch.manual_seed(11)
    value = loss.loss(global_model, guide, x)
    torch.manual_seed(11)
    z = loc + scale * torch.randn(num_outer * k)
    lw = global_log_joint(x, z) - torch.distributions.Normal(loc, scale).log_prob(z)
    expected = (torch.logsumexp(lw.reshape(num_outer, k), 1) - math.log(k)).mean()
    assert value == pytest.approx(-float(expected), rel=1e-5)
    # no plate is shared by every site: the whole trace is one "point"; the reported bound is
    # per data point (the N points of the data plate the whole-trace bound stands for)
    assert loss.last_terms["iw_bound"] * len(x) == pytest.approx(float(expected), rel=1e-5)


def test_global_latent_with_subsampling_raises_naming_the_site():
    """Check: global latent with subsampling raises naming the site."""
    x = toy_data(GLOBAL_N, 1, torch.zeros(1), seed=4).squeeze(-1)
    guide = make_global_guide(0.0, 1.0)
    loss = ImportanceWeightedELBO(num_particles=3)
    with pytest.raises(ValueError, match=r"'data' is subsampled.*site 'z'"):
        loss.loss(global_model, guide, x, 4)
    with pytest.raises(ValueError, match=r"site 'z'"):
        loss.loss_and_grads(global_model, guide, x, 4)


# -- clear errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"estimator": "reinforce"}, "estimator must be one of"),
        ({"variant": "miwae"}, "variant must be one of"),
        ({"num_particles": 0}, "num_particles must be a positive int"),
        ({"num_particles": -3}, "num_particles must be a positive int"),
        ({"num_particles": 2.5}, "num_particles must be a positive int"),
        ({"num_outer": 0}, "num_outer must be a positive int"),
        ({"ciwae_beta": 1.5}, "ciwae_beta must lie in"),
        ({"max_plate_nesting": -1}, "max_plate_nesting"),
    ],
)
def test_invalid_arguments_raise(kwargs, pattern):
    """Check: invalid arguments raise."""
    with pytest.raises(ValueError, match=pattern):
        ImportanceWeightedELBO(**kwargs)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_in_observed_data_names_the_site(x, estimator):
    """Check: nan in observed data names the site."""
    x = x.clone()
    x[3, 1] = float("nan")

    def guide(x, mu):  # does not read x, so only the model sees the NaN
        loc = pyro.param("loc", torch.zeros(N, D))
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    loss = ImportanceWeightedELBO(num_particles=3, estimator=estimator)
    with pytest.raises(ValueError, match="Observed site 'x' contains NaN"):
        loss.loss(toy_model, guide, x, MU)
    with pytest.raises(ValueError, match="Observed site 'x' contains NaN"):
        loss.differentiable_loss(toy_model, guide, x, MU)


def test_enumerated_guide_site_raises_naming_the_site():
    """Check: enumerated guide site raises naming the site."""

    def model():
        pyro.sample("c", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("c", dist.Bernoulli(0.4), infer={"enumerate": "parallel"})

    with pytest.raises(ValueError, match="Guide site 'c' asks for enumeration"):
        ImportanceWeightedELBO(num_particles=2, max_plate_nesting=0).loss(model, guide)


def test_masked_observations_are_left_out_of_the_log_weights(x):
    """Check: masked observations are left out of the log weights."""
    mask = torch.tensor([True, False] * (N // 2))
    init = toy_guide_params(D, MU, exact=False)
    guide = make_toy_guide(init)

    def model(x, mu):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            with poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    k = 4
    loss = ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1)
    torch.manual_seed(6)
    value = loss.loss(model, guide, x, MU)
    torch.manual_seed(6)
    a, b, s = init
    z = a * x + b + s * torch.randn(k, N, D)
    normal = torch.distributions.Normal
    lw = normal(MU, 1.0).log_prob(z).sum(-1) - normal(a * x + b, s).log_prob(z).sum(-1)
    lw = lw + mask * normal(z, 1.0).log_prob(x).sum(-1)
    expected = (torch.logsumexp(lw, 0) - math.log(k)).sum()
    assert value == pytest.approx(-float(expected), rel=1e-5)


def test_two_shared_plates_give_a_bound_per_cell():
    """Every site in plates 'rows' (dim -2) and 'cols' (dim -1): one bound per (row, col) cell."""
    y = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))

    def model(y):
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def guide(y):
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4, dim=-1):
            pyro.sample("z", dist.Normal(0.3 * y, 0.8))

    k = 5
    loss = ImportanceWeightedELBO(num_particles=k, max_plate_nesting=2)
    torch.manual_seed(9)
    value = loss.loss(model, guide, y)
    torch.manual_seed(9)
    z = 0.3 * y + 0.8 * torch.randn(k, 3, 4)
    normal = torch.distributions.Normal
    lw = normal(0.0, 1.0).log_prob(z) + normal(z, 1.0).log_prob(y)
    lw = lw - normal(0.3 * y, 0.8).log_prob(z)
    expected = (torch.logsumexp(lw, 0) - math.log(k)).sum()
    assert value == pytest.approx(-float(expected), rel=1e-5)
    assert loss.last_terms["iw_bound"] == pytest.approx(float(expected) / 12, rel=1e-5)


def _sequential_model(x, batch_size=None):
    for i in pyro.plate("data", x.shape[0], subsample_size=batch_size):
        z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
        pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=x[i])


def _sequential_guide(x, batch_size=None):
    for i in pyro.plate("data", x.shape[0], subsample_size=batch_size):
        pyro.sample(f"z_{i}", dist.Normal(0.2 * x[i] + 1.0, 0.5))


def test_sequential_plate_gets_the_whole_trace_bound_and_rejects_subsampling():
    """Check: sequential plate gets the whole trace bound and rejects subsampling.

    A sequential plate is not a point plate: the whole trace is one point. Subsampling it used
    to pass N / B off as a user scale, giving a silently biased minibatch estimate (8 SE off in
    one run); it now raises, naming the plate and a site.
    """
    x = torch.linspace(-1.0, 1.0, 6)
    k = 4
    loss = ImportanceWeightedELBO(num_particles=k, max_plate_nesting=0)
    torch.manual_seed(2)
    value = loss.loss(_sequential_model, _sequential_guide, x)
    torch.manual_seed(2)
    normal = torch.distributions.Normal
    lw = torch.zeros(k)
    for i in range(6):  # the guide draws z_0, ..., z_5 in turn, K particles each
        z = 0.2 * x[i] + 1.0 + 0.5 * torch.randn(k)
        lw += normal(0.0, 1.0).log_prob(z) + normal(z, 1.0).log_prob(x[i])
        lw -= normal(0.2 * x[i] + 1.0, 0.5).log_prob(z)
    expected = torch.logsumexp(lw, 0) - math.log(k)
    assert value == pytest.approx(-float(expected), rel=1e-5)
    with pytest.raises(ValueError, match=r"'data' is a subsampled sequential plate \(site 'z_"):
        loss.loss(_sequential_model, _sequential_guide, x, 2)
