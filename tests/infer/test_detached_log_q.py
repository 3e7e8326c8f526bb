"""STL / DReG compute ``log q`` once per step: from the detached guide, not also from the guide.

The values and gradients of both estimators are checked against hand-written torch elsewhere
(``test_importance_weighted_gradients.py``); these tests hold the cost: the guide's own
distribution is not evaluated when only the detached ``log q`` enters the bound, and still is
when a score-function term needs it.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vi_ext import ImportanceWeightedELBO


class _CountingNormal(dist.Normal):
    """A Normal that counts how often its log-density is evaluated (not rebuilt in place)."""

    calls = 0

    def log_prob(self, value):
        type(self).calls += 1
        return super().log_prob(value)


def _model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", _CountingNormal(loc, 1.0))


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_guide_log_density_is_evaluated_once_per_step(estimator, num_particles):
    """Check: one guide log-density per particle run, for every estimator."""
    pyro.clear_param_store()
    x = torch.randn(5)
    loss = ImportanceWeightedELBO(
        num_particles=num_particles,
        estimator=estimator,
        max_plate_nesting=1,
        vectorize_particles=False,
    )
    with pyro.validation_enabled(False):
        loss.loss_and_grads(_model, _guide, x)  # first call: structure checks
        _CountingNormal.calls = 0
        loss.loss_and_grads(_model, _guide, x)
    # a subclass is not rebuilt from its parameters, so STL/DReG replay the guide detached:
    # one evaluation per run of that replay, none of the guide trace's own distribution
    assert _CountingNormal.calls == num_particles


def _discrete_guide(x):
    probs = pyro.param("probs", torch.full((x.shape[0],), 0.5))
    loc = pyro.param("loc", torch.zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("b", dist.Bernoulli(probs))
        pyro.sample("z", _CountingNormal(loc, 1.0))


def _discrete_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("b", dist.Bernoulli(0.5))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_score_terms_still_get_the_guide_log_density():
    """Check: with a site without rsample (iwae), the guide's log-densities feed the score term."""
    pyro.clear_param_store()
    x = torch.randn(4)
    loss = ImportanceWeightedELBO(num_particles=1, estimator="iwae", max_plate_nesting=1)
    loss.loss_and_grads(_discrete_model, _discrete_guide, x)
    probs = pyro.param("probs").unconstrained()
    assert probs.grad is not None and torch.all(probs.grad != 0)


def _normal_guide(x):
    loc = pyro.param("loc", torch.arange(x.shape[0]) + 0.5)  # told apart from model locations
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_rebuilt_detached_normal_is_the_only_guide_evaluation(estimator, monkeypatch):
    """Check: a Normal guide rebuilt detached (no replay) costs one log-density, as iwae's."""
    pyro.clear_param_store()
    x = torch.randn(5)
    loss = ImportanceWeightedELBO(num_particles=1, estimator=estimator, max_plate_nesting=1)
    loss.loss_and_grads(_model, _normal_guide, x)
    calls = []
    original = torch.distributions.Normal.log_prob

    def counting(self, value):
        calls.append(self)
        return original(self, value)

    monkeypatch.setattr(torch.distributions.Normal, "log_prob", counting)
    with pyro.validation_enabled(False):
        loss.loss_and_grads(_model, _normal_guide, x)
    # the model's prior and likelihood, and one log q (the guide's own, or its detached copy)
    assert len(calls) == 3
    guide_loc = pyro.param("loc").detach()
    (guide_call,) = [d for d in calls if torch.equal(d.loc.detach(), guide_loc)]
    assert guide_call.loc.requires_grad == (estimator == "iwae")  # STL / DReG: q_sg(phi)
