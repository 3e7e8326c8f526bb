"""Per-step fixed costs of the bound losses (issue 12, eager path) and what they must not change.

* The STL/DReG detachment check replays the guide once per loss, also for a bound-method guide
  (a new object at every attribute access, which a weak set forgets at once).
* The finite-observation check reads one sum; a NaN or an infinity still raises naming the site,
  and finite values whose sum overflows do not.
* :attr:`last_terms` of a bound loss is computed on first read from detached tensors of the step:
  the same values as the terms computed at once, also when read after optimizer steps.
* ``ImportanceWeightedELBO`` evaluates its bound once per call unless its reported value differs.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.infer import _bounds, _weights


class CountingVAE:
    """A 4-3-2 VAE whose guide counts its runs; used through bound methods, as users do."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(2, 4)
        self.data = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed + 1))
        self.guide_runs = 0

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        self.guide_runs += 1
        pyro.module("encoder", self.encoder)
        out = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            scale = nn.functional.softplus(out[:, 2:]) + 1e-3
            pyro.sample("z", dist.Normal(out[:, :2], scale).to_event(1))


@pytest.fixture(autouse=True)
def _fresh_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_detachment_check_replays_the_guide_once_per_loss(estimator):
    runs = {}
    for name in ("iwae", estimator):
        pyro.clear_param_store()
        vae = CountingVAE()
        loss = ImportanceWeightedELBO(num_particles=2, estimator=name, max_plate_nesting=1)
        for _ in range(4):
            loss.differentiable_loss(vae.model, vae.guide, vae.data).backward()
        runs[name] = vae.guide_runs
    # the same runs as IWAE (one per step, the memory check's), plus one detachment replay
    assert runs[estimator] == runs["iwae"] + 1


def test_detachment_check_still_raises_for_an_unregistered_parameter():
    hidden = torch.zeros(2, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    class Guide:
        def guide(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Gamma(hidden.exp(), 1.0).to_event(1))

    loss = ImportanceWeightedELBO(num_particles=2, estimator="stl", max_plate_nesting=1)
    with pytest.raises(ValueError, match="Guide site 'z'"):
        loss.differentiable_loss(model, Guide().guide, torch.zeros(3, 2))


def _observed_trace(values: torch.Tensor) -> poutine.Trace:
    def model():
        with pyro.plate("data", values.shape[0]):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=values)

    return poutine.trace(model).get_trace()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_finite_observation_check_names_the_site(bad):
    values = torch.zeros(5)
    values[3] = bad
    with pytest.raises(ValueError, match="Observed site 'y'"):
        _weights.check_finite_observations(_observed_trace(values))


def test_finite_observation_check_accepts_finite_values_whose_sum_overflows():
    values = torch.full((4,), 3e38)
    assert not torch.isfinite(values.sum())
    _weights.check_finite_observations(_observed_trace(values))  # no error


def test_finite_observation_check_fires_in_the_loss():
    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    def guide(y):
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    data = torch.zeros(4)
    data[2] = math.inf
    loss = ImportanceWeightedELBO(num_particles=1, max_plate_nesting=1)
    with pytest.raises(ValueError, match="Observed site 'y'"):
        loss.differentiable_loss(model, guide, data)


def _terms_at_once(loss, vae, seed):
    """The terms as computed before deferral: from the weights of the same draws, at once."""
    pyro.set_rng_seed(seed)
    weights = _weights.trace_particles(
        vae.model,
        vae.guide,
        (vae.data,),
        {},
        num_particles=loss.num_outer * loss.num_particles,
        plate_nesting=1,
        detach_guide_parameters=loss.estimator != "iwae",
    )
    log_weights = weights.log_weights.reshape(loss.num_outer, loss.num_particles, -1).detach()
    value = weights.scale * loss.bound().value(log_weights).mean(0).sum()
    per_point = weights.scale / weights.points_represented
    return {
        "iw_bound": float(value / weights.points_represented),
        "elbo": float(_bounds.elbo_bound(log_weights).mean(0).sum() * per_point),
        "ess": float(_bounds.effective_sample_size(log_weights).mean()),
    }


@pytest.mark.parametrize(("estimator", "k", "m"), [("iwae", 1, 1), ("iwae", 3, 2), ("dreg", 4, 1)])
def test_last_terms_are_deferred_and_equal_the_terms_computed_at_once(estimator, k, m):
    vae = CountingVAE()
    loss = ImportanceWeightedELBO(
        num_particles=k, num_outer=m, estimator=estimator, max_plate_nesting=1
    )
    expected = _terms_at_once(loss, vae, seed=3)
    optimizer = torch.optim.SGD([*vae.encoder.parameters(), *vae.decoder.parameters()], lr=0.5)
    pyro.set_rng_seed(3)
    value = loss.differentiable_loss(vae.model, vae.guide, vae.data)
    assert loss._pending_terms is not None  # nothing computed yet
    value.backward()
    optimizer.step()  # changes the parameters in place: the terms must be this step's
    terms = loss.last_terms
    assert loss._pending_terms is None
    assert terms == expected
    assert terms["iw_bound"] == pytest.approx(-float(value.detach()) / vae.data.shape[0], rel=1e-6)
    assert loss.last_terms is terms  # evaluated once


def test_setting_last_terms_drops_the_pending_terms():
    vae = CountingVAE()
    loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1)
    loss.loss(vae.model, vae.guide, vae.data)
    loss.last_terms = {"iw_bound": 1.0}
    assert loss.last_terms == {"iw_bound": 1.0}


def test_bound_is_evaluated_once_unless_the_reported_value_differs(monkeypatch):
    vae = CountingVAE()
    calls = []
    original = _bounds.Bound.value

    def counting_value(self, log_weights):
        calls.append(self.name)
        return original(self, log_weights)

    monkeypatch.setattr(_bounds.Bound, "value", counting_value)
    for variant in ("iwae", "ciwae"):
        calls.clear()
        loss = ImportanceWeightedELBO(
            num_particles=2, num_outer=2, variant=variant, max_plate_nesting=1
        )
        assert loss.reports_bound_value()
        loss.differentiable_loss(vae.model, vae.guide, vae.data)
        assert len(calls) == 1, variant
    # PIWAE reports IWAE_MK, not the mean of its guide objective MIWAE(M, K)
    assert not ImportanceWeightedELBO(num_particles=2, variant="piwae").reports_bound_value()

    class OwnReport(ImportanceWeightedELBO):
        def reported_value(self, log_weights):
            return super().reported_value(log_weights) + 1.0

    assert not OwnReport(num_particles=2).reports_bound_value()


def test_a_probe_run_cleans_up_a_module_registered_under_two_names():
    """One nn.Module under two pyro.module names: the probe's store clean-up neither raises nor
    drops an entry that existed before it."""
    import pyro
    from torch import nn

    from pyro_vi_ext.infer._weights import _side_effect_free

    shared = nn.Linear(2, 2)
    pyro.clear_param_store()
    with _side_effect_free():
        pyro.module("decoder", shared)
        pyro.module("encoder", shared)
    assert list(pyro.get_param_store().keys()) == []

    pyro.module("decoder", shared)
    before = sorted(pyro.get_param_store().keys())
    with _side_effect_free():
        pyro.module("encoder", shared)
    store = pyro.get_param_store()
    assert set(before) <= set(store.keys())
    for name in before:
        assert store.param_name(store.get_param(name).unconstrained()) is not None
