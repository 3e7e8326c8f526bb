"""The surrogate builders of ``_gradients.py`` against hand-written torch on the same numbers."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vi_ext.infer._bounds import Bound
from pyro_vi_ext.infer._gradients import (
    DregAliases,
    check_estimator,
    leave_one_out_signals,
    needs_detached_guide,
    score_function_surrogate,
    split_surrogate,
    surrogate_loss,
    trace_parameters,
)

BOUNDS = [Bound.iwae(), Bound.ciwae(0.3), Bound.renyi(0.5), Bound.renyi(1.0), Bound.renyi(2.0)]
IDS = [f"{b.name}-{b.alpha}-{b.elbo_weight}" for b in BOUNDS]
normal = torch.distributions.Normal


def _log_weights(outer=2, particles=4, points=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(outer, particles, points, generator=generator).double()


def test_surrogate_loss_has_the_value_of_one_and_the_gradient_of_the_other():
    """Check: surrogate loss has the value of one and the gradient of the other."""
    theta = torch.tensor(2.0, requires_grad=True)
    loss = surrogate_loss(theta**2, 3.0 * theta)
    (grad,) = torch.autograd.grad(loss, theta)
    assert float(loss.detach()) == -4.0 and float(grad) == -3.0


def test_estimator_names():
    """Check: estimator names."""
    check_estimator("dreg")
    with pytest.raises(ValueError, match="estimator must be one of"):
        check_estimator("reinforce")
    assert [needs_detached_guide(e) for e in ("iwae", "stl", "dreg")] == [False, True, True]


@pytest.mark.parametrize("bound", BOUNDS, ids=IDS)
def test_leave_one_out_signals_equal_a_loop(bound):
    """Check: leave one out signals equal a loop.

    Without plate elements (E = 1) the signal is VIMCO's: particle k replaced by the others'
    mean; with one particle it is the log-weight itself.
    """
    lw = _log_weights()
    signals = leave_one_out_signals(bound, lw)
    assert signals.shape == (*lw.shape, 1)
    value = bound.value(lw)
    for k in range(lw.shape[1]):
        replaced = lw.clone()
        others = torch.cat([lw[:, :k], lw[:, k + 1 :]], 1)
        replaced[:, k] = others.mean(1)
        torch.testing.assert_close(signals[:, k, :, 0], value - bound.value(replaced))
    single = _log_weights(particles=1)
    torch.testing.assert_close(leave_one_out_signals(bound, single)[..., 0], single)


@pytest.mark.parametrize("bound", BOUNDS, ids=IDS)
def test_rao_blackwellized_signals_equal_a_loop(bound):
    """Check: rao blackwellized signals equal a loop.

    Per plate element e: particle k's log-weight becomes O_ke + mean_{j != k} R_je with
    O = log w - R; with one particle the signal is R (Trace_ELBO's sum_to).
    """
    outer, particles, points, elements = 2, 4, 3, 5
    generator = torch.Generator().manual_seed(7)
    site_lw = torch.randn(outer, particles, points, elements, generator=generator).double()
    rest = torch.randn(outer, particles, points, generator=generator).double()
    lw = rest + site_lw.sum(-1)  # R_e = rest + element e's own terms, as sum_to would give
    site_r = rest.unsqueeze(-1) + site_lw
    signals = leave_one_out_signals(bound, lw, site_r)
    value = bound.value(lw)
    for k in range(particles):
        for e in range(elements):
            replaced = lw.clone()
            other_r = torch.cat([site_r[:, :k, :, e], site_r[:, k + 1 :, :, e]], 1).mean(1)
            replaced[:, k] = lw[:, k] - site_r[:, k, :, e] + other_r
            torch.testing.assert_close(signals[:, k, :, e], value - bound.value(replaced))
    one = leave_one_out_signals(bound, lw[:, :1], site_r[:, :1])
    torch.testing.assert_close(one, site_r[:, :1])


@pytest.mark.parametrize("bound", BOUNDS, ids=IDS)
def test_score_function_surrogate_gradient_is_the_signal(bound):
    """Check: score function surrogate gradient is the signal."""
    lw = _log_weights().requires_grad_()
    score = torch.zeros(*lw.shape, 1, dtype=lw.dtype, requires_grad=True)
    surrogate = score_function_surrogate(bound, lw, score)
    grad_score, grad_lw = torch.autograd.grad(surrogate.sum(), [score, lw], allow_unused=True)
    torch.testing.assert_close(grad_score, leave_one_out_signals(bound, lw))
    assert grad_lw is None  # the signal is detached


def _toy_log_weights(z, x, loc, scale, mu):
    return normal(mu, 1.0).log_prob(z) + normal(z, 1.0).log_prob(x) - normal(loc, scale).log_prob(z)


@pytest.mark.parametrize("bound", BOUNDS, ids=IDS)
def test_dreg_hooks_give_the_path_weighted_gradient(bound):
    """Guide: sum_k path_k * dlogw_k/dz_k * dz_k/dphi; model: sum_k particle_k * dlogp_k/dmu."""
    outer, particles, points = 2, 5, 3
    generator = torch.Generator().manual_seed(3)
    eps = torch.randn(outer, particles, points, generator=generator).double()
    x = torch.tensor([0.5, -1.0, 2.0]).double()
    loc = torch.tensor([0.1, 0.2, -0.3]).double().requires_grad_()
    log_scale = torch.tensor([0.1, -0.2, 0.3]).double().requires_grad_()
    mu = torch.tensor(0.4).double().requires_grad_()
    scale = log_scale.exp()
    z = loc + scale * eps
    aliases = DregAliases()
    alias = aliases("z", z)
    lw = _toy_log_weights(alias, x, loc.detach(), scale.detach(), mu)
    aliases.reweight(bound, lw, lambda factor, name, index: factor.reshape(z.shape))
    grads = torch.autograd.grad(bound.value(lw).sum(), [loc, log_scale, mu])

    with torch.no_grad():
        zd = z.detach()
        # d log w / d z with phi held fixed
        dlw_dz = -zd + mu + (x - zd) + (zd - loc) / scale**2
        path = bound.path_weights(lw.detach())
        particle = bound.particle_weights(lw.detach())
        expected_loc = (path * dlw_dz).sum((0, 1))
        expected_log_scale = (path * dlw_dz * scale * eps).sum((0, 1))
        expected_mu = (particle * (zd - mu)).sum()
    torch.testing.assert_close(grads[0], expected_loc)
    torch.testing.assert_close(grads[1], expected_log_scale)
    torch.testing.assert_close(grads[2], expected_mu)


def test_dreg_aliases_leave_tensors_without_graph_alone():
    """Check: dreg aliases leave tensors without graph alone."""
    aliases = DregAliases()
    plain = torch.ones(3)
    assert aliases("c", plain) is plain and aliases.aliases == {}


def test_split_surrogate_routes_each_objective_to_its_parameters():
    """Check: split surrogate routes each objective to its parameters."""
    theta = torch.tensor(1.5, requires_grad=True)
    phi = torch.tensor(-0.5, requires_grad=True)
    model_objective = theta**2 * phi
    guide_objective = theta * phi**3
    surrogate = split_surrogate(model_objective, guide_objective, [theta], [phi])
    grad_theta, grad_phi = torch.autograd.grad(surrogate, [theta, phi])
    assert float(grad_theta) == pytest.approx(2 * 1.5 * -0.5)
    assert float(grad_phi) == pytest.approx(1.5 * 3 * 0.25)


def test_trace_parameters_finds_param_sites_and_module_parameters():
    """Check: trace parameters finds param sites and module parameters."""
    layer = torch.nn.Linear(2, 1)

    def guide():
        pyro.param("loc", torch.zeros(2))
        pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
        pyro.module("layer", layer)

    trace = pyro.poutine.trace(guide).get_trace()
    found = {id(p) for p in trace_parameters(trace, guide)}
    store = pyro.get_param_store()
    expected = {id(store.get_param("loc")), id(store.get_param("scale").unconstrained())}
    expected |= {id(p) for p in layer.parameters()}
    assert found == expected
    found_module = {id(p) for p in trace_parameters(pyro.poutine.Trace(), layer)}
    assert found_module == {id(p) for p in layer.parameters()}
