import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from models.eight_schools import (
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    NUM_SCHOOLS,
    build_eight_schools,
    eight_schools_centered,
    eight_schools_data,
    eight_schools_noncentered,
)
from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.training import fit
from tests.models._helpers import GLOBAL_LATENT_LOSSES, IW_ESTIMATORS, make_loss, train_and_check

PARAMETERIZATIONS = ("centered", "noncentered")


def test_data_are_the_classic_values():
    assert EIGHT_SCHOOLS_Y == (28, 8, -3, 7, -1, 1, 18, 12)
    assert EIGHT_SCHOOLS_SIGMA == (15, 10, 16, 11, 9, 11, 10, 18)
    sigma, y = eight_schools_data()
    assert sigma.shape == y.shape == (NUM_SCHOOLS,) and sigma.dtype == torch.float32
    assert sigma.tolist() == list(EIGHT_SCHOOLS_SIGMA) and y.tolist() == list(EIGHT_SCHOOLS_Y)
    sigma[0] = 0.0  # fresh tensors: the constants stay intact
    assert eight_schools_data(torch.float64)[0][0] == 15.0


@pytest.mark.parametrize("loss_name", GLOBAL_LATENT_LOSSES)
@pytest.mark.parametrize("guide_family", ["mean_field", "full_rank"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_trains_with_every_loss_on_all_schools(parameterization, guide_family, loss_name):
    model, guide = build_eight_schools(parameterization, guide=guide_family)
    expected = AutoNormal if guide_family == "mean_field" else AutoMultivariateNormal
    assert isinstance(guide, expected)
    train_and_check(model, guide, make_loss(loss_name), eight_schools_data())


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_trains_with_trace_elbo_on_a_subset_of_schools(parameterization):
    model, guide = build_eight_schools(parameterization)
    sigma, y = eight_schools_data()
    idx = torch.tensor([1, 4, 6])
    kwargs = {"idx": idx, "n_data": NUM_SCHOOLS}
    train_and_check(model, guide, Trace_ELBO(), (sigma[idx], y[idx]), kwargs)


@pytest.mark.parametrize("estimator", IW_ESTIMATORS)
def test_subsampled_importance_weighting_raises(estimator):
    model, guide = build_eight_schools("noncentered")
    sigma, y = eight_schools_data()
    idx = torch.tensor([0, 2])
    loss = ImportanceWeightedELBO(num_particles=3, estimator=estimator)
    with pytest.raises(ValueError, match="subsampled"):
        loss.loss(model, guide, sigma[idx], y[idx], idx=idx, n_data=NUM_SCHOOLS)


def test_mean_field_guide_draws_the_schools_of_the_minibatch():
    """AutoNormal gets the model's plate: its theta for a subset are those schools' theta."""
    model, guide = build_eight_schools("centered", init_scale=1e-6)
    sigma, y = eight_schools_data()
    guide(sigma, y)  # set up on all schools
    with torch.no_grad():
        guide.locs.theta.copy_(100.0 * torch.arange(NUM_SCHOOLS, dtype=torch.float32))
    idx = torch.tensor([6, 1, 3])
    guide_trace = poutine.trace(guide).get_trace(sigma[idx], y[idx], idx=idx, n_data=NUM_SCHOOLS)
    assert torch.allclose(guide_trace.nodes["theta"]["value"], 100.0 * idx.float(), atol=1e-3)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        sigma[idx], y[idx], idx=idx, n_data=NUM_SCHOOLS
    )
    assert torch.equal(model_trace.nodes["y"]["value"], y[idx])
    assert model_trace.nodes["y"]["scale"] == pytest.approx(NUM_SCHOOLS / 3)
    assert model_trace.nodes["theta"]["scale"] == pytest.approx(NUM_SCHOOLS / 3)
    assert model_trace.nodes["mu"]["scale"] == 1.0


@pytest.mark.parametrize("subset", [None, [0, 5, 7]])
def test_parameterizations_define_the_same_joint(subset):
    """log p_nc(mu, tau, theta_tilde, y) = log p_c(mu, tau, mu + tau theta_tilde, y) + J log tau,
    with J the (scaled) number of schools: the Jacobian of theta_tilde -> theta."""
    sigma, y = eight_schools_data(torch.float64)
    kwargs = {}
    if subset is not None:
        idx = torch.tensor(subset)
        sigma, y, kwargs = sigma[idx], y[idx], {"idx": idx, "n_data": NUM_SCHOOLS}
    mu = torch.tensor(3.0, dtype=torch.float64)
    tau = torch.tensor(2.5, dtype=torch.float64)
    theta_tilde = torch.linspace(-1.0, 1.5, len(sigma), dtype=torch.float64)
    theta = mu + tau * theta_tilde
    nc = poutine.trace(
        poutine.condition(
            eight_schools_noncentered, data={"mu": mu, "tau": tau, "theta_tilde": theta_tilde}
        )
    ).get_trace(sigma, y, **kwargs)
    c = poutine.trace(
        poutine.condition(eight_schools_centered, data={"mu": mu, "tau": tau, "theta": theta})
    ).get_trace(sigma, y, **kwargs)
    assert torch.allclose(nc.nodes["theta"]["value"], theta)
    jacobian = NUM_SCHOOLS * torch.log(tau)  # len(sigma) schools, each scaled by N / B
    assert torch.allclose(nc.log_prob_sum(), c.log_prob_sum() + jacobian)


def test_deterministic_theta_and_prior_predictive():
    pyro.set_rng_seed(2)
    sigma, _ = eight_schools_data()
    trace = poutine.trace(eight_schools_noncentered).get_trace(sigma)
    nodes = trace.nodes
    expected = nodes["mu"]["value"] + nodes["tau"]["value"] * nodes["theta_tilde"]["value"]
    assert torch.allclose(nodes["theta"]["value"], expected)
    assert nodes["theta"]["infer"].get("_deterministic")
    assert nodes["y"]["value"].shape == (NUM_SCHOOLS,) and not nodes["y"]["is_observed"]
    assert nodes["tau"]["value"] > 0
    frames = [f.name for f in nodes["theta_tilde"]["cond_indep_stack"]]
    assert frames == ["school"]


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="parameterization"):
        build_eight_schools("partial")
    with pytest.raises(ValueError, match="guide"):
        build_eight_schools(guide="flow")
    with pytest.raises(ValueError, match="init_scale"):
        build_eight_schools(init_scale=0.0)
    sigma, y = eight_schools_data()
    with pytest.raises(ValueError, match="no idx"):
        eight_schools_centered(sigma[:3], y[:3], n_data=NUM_SCHOOLS)


def test_fit_on_all_schools_and_on_minibatches_of_schools():
    model, guide = build_eight_schools("noncentered")
    data = eight_schools_data()
    loss = ImportanceWeightedELBO(num_particles=4, estimator="dreg")
    adam = pyro.optim.Adam({"lr": 0.02})
    full = fit(model, guide, data, loss, adam, num_steps=5, progress=False)
    sub = fit(model, guide, data, Trace_ELBO(), adam, num_steps=4, batch_size=3, progress=False)
    assert all(math.isfinite(v) for v in [*full.history["loss"], *sub.history["loss"]])
    with pytest.raises(ValueError, match="subsampled"):
        fit(model, guide, data, loss, adam, num_steps=1, batch_size=3, progress=False)


def test_full_rank_guide_refuses_a_subset_of_schools():
    model, guide = build_eight_schools("centered", guide="full_rank")
    sigma, y = eight_schools_data()
    loss = Trace_ELBO()
    for idx in (torch.tensor([1, 4, 6]), torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])):
        with pytest.raises(ValueError, match="full data"):
            loss.loss(model, guide, sigma[idx], y[idx], idx=idx, n_data=NUM_SCHOOLS)
    assert guide.prototype_trace is None  # nothing was set up from a subset
    # the runner's full batch (idx = arange(N)) is the full data
    result = fit(
        model, guide, (sigma, y), loss, pyro.optim.Adam({"lr": 0.01}), num_steps=2, progress=False
    )
    assert all(math.isfinite(v) for v in result.history["loss"])
    assert guide.loc.shape == (2 + NUM_SCHOOLS,)
