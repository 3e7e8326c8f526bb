"""Model-side enumeration: discrete model sites summed out exactly inside log p(x, z).

A Gaussian mixture with a continuous local latent ``z_n`` (in the guide) and an enumerated
assignment ``c_n`` (not in the guide): ``log p(x_n, z_n) = log N(z_n; 0, 1) + log sum_c pi_c
N(x_n; m_c + z_n, s^2)``, checked against brute-force summation on the same draws, and at ``K = 1``
against ``TraceEnum_ELBO`` (value and gradient).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from pyro_vi_ext import ImportanceWeightedELBO, RenyiAlphaELBO
from pyro_vi_ext.infer._weights import trace_particles

N = 6
WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = torch.tensor([-2.0, 1.5])
NOISE = 0.7


def _data():
    return torch.tensor([-2.1, -1.7, 1.2, 1.9, 0.4, 1.6])


@config_enumerate
def gmm_model(x):
    """Gaussian mixture: continuous z_n, enumerated assignment c_n, observed x_n."""
    locs = pyro.param("locs", LOCS.clone())
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Categorical(WEIGHTS))
        pyro.sample("x", dist.Normal(Vindex(locs)[..., c] + z, NOISE), obs=x)


def gmm_guide(x):
    """Guide for the mixture: a Normal per data point for z_n only."""
    loc = pyro.param("q_loc", torch.zeros(x.shape[0]))
    scale = pyro.param(
        "q_scale", torch.full((x.shape[0],), 0.8), constraint=dist.constraints.positive
    )
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def brute_force_log_joint(x, z):
    """``log p(x_n, z_n)`` summing the assignment by hand, for ``z`` of shape ``[..., N]``."""
    normal = torch.distributions.Normal
    per_component = WEIGHTS.log()[:, None] + normal(
        LOCS[:, None] + z[..., None, :], NOISE
    ).log_prob(x)
    return normal(0.0, 1.0).log_prob(z) + torch.logsumexp(per_component, -2)


@pytest.mark.parametrize("vectorize", [True, False])
def test_enumerated_site_is_summed_out_exactly(vectorize):
    """Check: enumerated site is summed out exactly."""
    x = _data()
    weights = trace_particles(
        gmm_model, gmm_guide, (x,), {}, num_particles=5, plate_nesting=1, vectorize=vectorize
    )
    if vectorize:
        z = weights.guide_trace.nodes["z"]["value"].reshape(5, N)
    else:
        z = torch.stack([run.guide_trace.nodes["z"]["value"] for run in weights.runs])
    torch.testing.assert_close(weights.log_p, brute_force_log_joint(x, z.detach()))
    assert weights.point_plates[0].name == "data"  # still one bound per data point


def test_iw_bound_matches_brute_force_summation_on_the_same_draws():
    """Check: iw bound matches brute force summation on the same draws."""
    x = _data()
    k = 7
    loss = ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1)
    torch.manual_seed(3)
    value = loss.loss(gmm_model, gmm_guide, x)
    torch.manual_seed(3)
    z = 0.8 * torch.randn(k, N)
    log_q = torch.distributions.Normal(0.0, 0.8).log_prob(z)
    lw = brute_force_log_joint(x, z) - log_q
    expected = (torch.logsumexp(lw, 0) - math.log(k)).sum()
    assert value == pytest.approx(-float(expected), rel=1e-5)


@pytest.mark.parametrize("cls", [ImportanceWeightedELBO, RenyiAlphaELBO])
def test_k1_equals_trace_enum_elbo_value_and_gradient(cls):
    """Check: k1 equals trace enum elbo value and gradient."""
    x = _data()
    pyro.set_rng_seed(0)
    TraceEnum_ELBO(max_plate_nesting=1).loss(gmm_model, gmm_guide, x)
    names = ["locs", "q_loc", "q_scale"]
    params = [pyro.get_param_store().get_param(n).unconstrained() for n in names]
    pyro.set_rng_seed(8)
    ours = cls(num_particles=1, max_plate_nesting=1).differentiable_loss(gmm_model, gmm_guide, x)
    pyro.set_rng_seed(8)
    theirs = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(gmm_model, gmm_guide, x)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    for name, mine, expected in zip(
        names, torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params), strict=True
    ):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_gmm_trains_with_svi():
    """Check: gmm trains with svi."""
    x = _data()
    loss = ImportanceWeightedELBO(num_particles=5, max_plate_nesting=1, estimator="dreg")
    svi = pyro.infer.SVI(gmm_model, gmm_guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    losses = [svi.step(x) for _ in range(30)]
    assert sum(losses[-6:]) < sum(losses[:6])


def test_enumeration_mark_on_a_site_the_guide_samples_is_ignored():
    """Check: a model site marked for enumeration but sampled by the guide is replayed, not summed.

    ``config_enumerate`` marks every discrete model site; the guide's draw of ``z`` wins, as in
    ``TraceEnum_ELBO``.
    """
    from tests.infer.toy_models import bernoulli_model, make_bernoulli_guide

    x = torch.tensor([-1.2, 0.4, 1.5])
    guide = make_bernoulli_guide(torch.tensor([0.3, -0.2, 1.0]))
    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    torch.manual_seed(2)
    plain = loss.loss(bernoulli_model, guide, x)
    torch.manual_seed(2)
    marked = loss.loss(config_enumerate(bernoulli_model), guide, x)
    assert marked == pytest.approx(plain, rel=1e-6)
