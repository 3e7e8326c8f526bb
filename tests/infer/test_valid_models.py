"""Conformance over the shapes of valid Pyro models, for every bound loss of the package.

For each model/guide pair and each loss:

* ``K = 1``: value and gradient equal ``Trace_ELBO``'s (``TraceEnum_ELBO`` with model-side
  enumeration) on the same draws (both seeded identically); STL and DReG drop the score term by
  design, so for them the value is compared;
* ``K > 1``: the bound is at least the ELBO on the same draws (``last_terms``), or the intended
  clear error (subsampled plates with latents outside them, subsampled sequential plates; models
  that do not broadcast under the vectorized particle plate);
* the sequential and vectorized paths agree on replayed draws (per-particle log-weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from pyro_vi_ext import ImportanceWeightedELBO, RenyiAlphaELBO
from pyro_vi_ext.infer._weights import ParticleVectorizationError, trace_particles
from tests.infer.test_sequential import BayesianRegression
from tests.infer.toy_models import NonReparamNormal, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
GEN = torch.Generator().manual_seed(0)
X = torch.randn(6, 2, generator=GEN)
Y = torch.randn(6, generator=GEN)
IDX = torch.tensor([0, 2, 5])


def _positive(name, shape, value=0.8):
    return pyro.param(name, torch.full(shape, value), constraint=constraints.positive)


# -- the models ---------------------------------------------------------------------------------
def local_model(idx=None):
    """Local latents in a (possibly subsampled) data plate."""
    with pyro.plate("data", 6, subsample=idx) as i:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=X[i])


def local_guide(idx=None):
    """Mean-field guide for the local model."""
    loc = pyro.param("loc", torch.zeros(6, 2))
    with pyro.plate("data", 6, subsample=idx) as i:
        pyro.sample("z", dist.Normal(loc[i], _positive("s", (2,))).to_event(1))


def global_local_model(idx=None):
    """Sample a global latent and local latents in a data plate."""
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 6, subsample=idx) as i:
        z = pyro.sample("z", dist.Normal(g, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=Y[i])


def global_local_guide(idx=None):
    """Guide for the global and local latents."""
    pyro.sample("g", dist.Normal(pyro.param("g_loc", torch.tensor(0.1)), _positive("g_s", ())))
    loc = pyro.param("loc", torch.zeros(6))
    with pyro.plate("data", 6, subsample=idx) as i:
        pyro.sample("z", dist.Normal(loc[i], 0.7))


def nested_model():
    """Per-row latents and per-cell latents in nested plates."""
    with pyro.plate("rows", 3, dim=-2):
        r = pyro.sample("r", dist.Normal(0.0, 1.0))
        with pyro.plate("cols", 2, dim=-1):
            c = pyro.sample("c", dist.Normal(r, 1.0))
            pyro.sample("obs", dist.Normal(c, 0.5), obs=X[:3])


def nested_guide():
    """Guide for the nested-plate model."""
    with pyro.plate("rows", 3, dim=-2):
        pyro.sample("r", dist.Normal(pyro.param("r_loc", torch.zeros(3, 1)), 0.8))
        with pyro.plate("cols", 2, dim=-1):
            pyro.sample("c", dist.Normal(pyro.param("c_loc", torch.zeros(3, 2)), 0.6))


def sequential_model(batch=None):
    """Latents in a sequential (Python loop) plate."""
    for i in pyro.plate("data", 4, subsample=batch):
        z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
        pyro.sample(f"y_{i}", dist.Normal(z, 1.0), obs=Y[i])


def sequential_guide(batch=None):
    """Guide for the sequential-plate model."""
    loc = pyro.param("loc", torch.zeros(4))
    for i in pyro.plate("data", 4, subsample=batch):
        pyro.sample(f"z_{i}", dist.Normal(loc[i], 0.8))


MASK = torch.tensor([True, False, True, True, False, True])


def masked_model():
    """Observations partly masked out with poutine.mask."""
    with pyro.plate("data", 6):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=MASK):
            pyro.sample("y", dist.Normal(z, 0.5), obs=Y)


def masked_guide():
    """Guide for the masked model."""
    with pyro.plate("data", 6):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(6)), 0.7))


def scaled_model():
    """Put a poutine.scale on the latent sites only (KL annealing)."""
    with pyro.plate("data", 6):
        with poutine.scale(scale=0.3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=Y)


def scaled_guide():
    """Guide with the same scale on its latent."""
    with pyro.plate("data", 6), poutine.scale(scale=0.3):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(6)), 0.7))


def uniformly_scaled(fn):
    """Return ``fn`` under a poutine.scale of 0.25 on every site."""

    def wrapped(*args, **kwargs):
        with poutine.scale(scale=0.25):
            return fn(*args, **kwargs)

    return wrapped


def nonreparam_model():
    """Global and local latents without rsample."""
    g = pyro.sample("g", NonReparamNormal(0.0, 1.0))
    with pyro.plate("data", 6):
        z = pyro.sample("z", NonReparamNormal(g, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=Y)


def nonreparam_guide():
    """Guide whose sites have no rsample (score-function terms)."""
    pyro.sample("g", NonReparamNormal(pyro.param("g_loc", torch.tensor(0.2)), 0.9))
    with pyro.plate("data", 6):
        pyro.sample("z", NonReparamNormal(pyro.param("loc", torch.zeros(6)), 0.7))


def extra_dims_model():
    """Observe ``z + loc``, ``loc`` of shape [3] (not a plate dim), inside a plate of 2 at -2."""
    loc = pyro.param("m_loc", torch.tensor([0.5, -0.5, 1.0]))
    with pyro.plate("pairs", 2, dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + loc, 1.0), obs=torch.ones(2, 3))


def extra_dims_guide():
    """Guide for the extra-batch-dims model."""
    with pyro.plate("pairs", 2, dim=-2):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(2, 1)), 0.8))


def batch_left_of_plates_model():
    """Batch left of plates model.

    Batch dims left of max_plate_nesting that are not plates (Pyro allows and sums them): a
    latent of batch shape [3, 2] in a plate of 2.
    """
    with pyro.plate("data", 2):
        z = pyro.sample("z", dist.Normal(torch.zeros(3, 2), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor([0.3, -0.2]))


def batch_left_of_plates_guide():
    """Guide with the same batch shape [3, 2]."""
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(3, 2)), 0.8))


@config_enumerate
def mixture_model():
    """Gaussian mixture with an enumerated assignment."""
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", 6):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.4, 0.6])))
        pyro.sample("y", dist.Normal(Vindex(locs)[..., c] + z, 0.5), obs=Y)


def mixture_guide():
    """Continuous guide for the mixture."""
    with pyro.plate("data", 6):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(6)), 0.7))


REGRESSION = BayesianRegression(2, 1)
REGRESSION_GUIDE = AutoDiagonalNormal(REGRESSION)


@dataclass(frozen=True)
class Case:
    """A model/guide pair with what the suite expects from it."""

    name: str
    model: Callable
    guide: Callable
    nesting: int
    args: tuple = ()
    many_particles_error: str | None = None  # the intended ValueError for K > 1
    broadcasts: bool = True  # runs under the vectorized particle plate
    enumerated: bool = False


CASES = [
    Case("local", local_model, local_guide, 1),
    Case("local-minibatch", local_model, local_guide, 1, (IDX,)),
    Case("global+local", global_local_model, global_local_guide, 1),
    Case(
        "global+local-minibatch",
        global_local_model,
        global_local_guide,
        1,
        (IDX,),
        many_particles_error=r"'data' is subsampled.*site 'g'",
    ),
    Case("nested", nested_model, nested_guide, 2),
    Case("sequential-plate", sequential_model, sequential_guide, 0),
    Case(
        "sequential-plate-minibatch",
        sequential_model,
        sequential_guide,
        0,
        ([1, 3],),
        many_particles_error="subsampled sequential plate",
    ),
    Case("mask", masked_model, masked_guide, 1),
    Case("site-scale", scaled_model, scaled_guide, 1),
    Case("uniform-scale", uniformly_scaled(local_model), uniformly_scaled(local_guide), 1),
    Case("non-reparameterized", nonreparam_model, nonreparam_guide, 1),
    Case("extra-batch-dims", extra_dims_model, extra_dims_guide, 2),
    Case(
        "batch-left-of-plates",
        batch_left_of_plates_model,
        batch_left_of_plates_guide,
        1,
        broadcasts=False,
    ),
    Case("pyro-module-regression", REGRESSION, REGRESSION_GUIDE, 1, (X, Y), broadcasts=False),
    Case("enumerated-mixture", mixture_model, mixture_guide, 1, enumerated=True),
]

LOSSES = {
    "iw-iwae": lambda **kw: ImportanceWeightedELBO(estimator="iwae", **kw),
    "iw-stl": lambda **kw: ImportanceWeightedELBO(estimator="stl", **kw),
    "iw-dreg": lambda **kw: ImportanceWeightedELBO(estimator="dreg", **kw),
    "iw-ciwae": lambda **kw: ImportanceWeightedELBO(variant="ciwae", ciwae_beta=0.3, **kw),
    "iw-piwae": lambda **kw: ImportanceWeightedELBO(variant="piwae", **kw),
    "renyi-iwae": lambda **kw: RenyiAlphaELBO(alpha=0.5, **kw),
    "renyi-dreg": lambda **kw: RenyiAlphaELBO(alpha=0.5, estimator="dreg", **kw),
}
PATH_GRADIENT_ONLY = {"iw-stl", "iw-dreg", "renyi-dreg"}


def _reparameterized(case: Case) -> bool:
    return case.name != "non-reparameterized"


def _reference(case: Case):
    if case.enumerated:
        return TraceEnum_ELBO(max_plate_nesting=case.nesting)
    return Trace_ELBO(max_plate_nesting=case.nesting)


def _init(case: Case):
    pyro.set_rng_seed(0)
    _reference(case).loss(case.model, case.guide, *case.args)
    return [p for _, p in pyro.get_param_store().named_parameters()]


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_one_particle_equals_the_reference_elbo(case, loss_name):
    """Check: one particle equals the reference elbo."""
    if loss_name in PATH_GRADIENT_ONLY and not _reparameterized(case):
        pytest.skip("STL/DReG refuse guide sites without rsample (tested elsewhere)")
    params = _init(case)
    pyro.set_rng_seed(3)
    loss = LOSSES[loss_name](num_particles=1, max_plate_nesting=case.nesting)
    ours = loss.differentiable_loss(case.model, case.guide, *case.args)
    pyro.set_rng_seed(3)
    theirs = _reference(case).differentiable_loss(case.model, case.guide, *case.args)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-5)
    if loss_name in PATH_GRADIENT_ONLY:
        return
    mine = torch.autograd.grad(ours, params, allow_unused=True)
    expected = torch.autograd.grad(theirs, params, allow_unused=True)
    for name_param, a, b in zip(pyro.get_param_store().keys(), mine, expected, strict=True):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name_param)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("loss_name", ["iw-iwae", "iw-dreg", "iw-ciwae", "renyi-iwae"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_many_particles_bound_is_at_least_the_elbo_or_a_clear_error(case, loss_name, vectorize):
    """Check: many particles bound is at least the elbo or a clear error."""
    if loss_name == "iw-dreg" and not _reparameterized(case):
        pytest.skip("DReG refuses guide sites without rsample (tested elsewhere)")
    _init(case)
    # 4 particles: no batch dim of any case has size 4 (a dim of size K left of the plates would
    # pass for the particle dim, which no vectorized estimator can tell apart)
    loss = LOSSES[loss_name](
        num_particles=4, max_plate_nesting=case.nesting, vectorize_particles=vectorize
    )
    if case.many_particles_error is not None:
        with pytest.raises(ValueError, match=case.many_particles_error):
            loss.loss_and_grads(case.model, case.guide, *case.args)
        return
    if vectorize and not case.broadcasts:
        with pytest.raises(ParticleVectorizationError, match="vectorize_particles=False"):
            loss.loss_and_grads(case.model, case.guide, *case.args)
        return
    value = loss.loss_and_grads(case.model, case.guide, *case.args)
    terms = loss.last_terms
    assert torch.isfinite(torch.tensor(value))
    assert terms[loss.bound_term] >= terms["elbo"] - 1e-5
    grads = [p.grad for _, p in pyro.get_param_store().named_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


class _ReplayParticles:
    """A guide replaying particle ``k``'s values of a vectorized run on its ``k``-th call."""

    def __init__(self, guide, vectorized_trace, natural_trace, nesting):
        self.guide, self.calls = guide, 0
        self.values = {}
        for name, site in natural_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and name in vectorized_trace:
                batched = vectorized_trace.nodes[name]["value"]
                self.values[name] = (batched, site, site["value"].shape)

    def __call__(self, *args, **kwargs):
        trace = poutine.Trace()
        for name, (batched, site, shape) in self.values.items():
            value = batched.reshape(batched.shape[0], *shape)[self.calls]
            trace.add_node(name, **{**site, "value": value})
        self.calls += 1
        return poutine.replay(self.guide, trace=trace)(*args, **kwargs)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.broadcasts and c.many_particles_error is None],
    ids=lambda c: c.name,
)
def test_sequential_and_vectorized_agree_on_replayed_draws(case):
    """Check: sequential and vectorized agree on replayed draws."""
    _init(case)
    k = 4
    with torch.no_grad():
        vectorized = trace_particles(
            case.model, case.guide, case.args, {}, num_particles=k, plate_nesting=case.nesting
        )
        natural = trace_particles(
            case.model, case.guide, case.args, {}, num_particles=1, plate_nesting=case.nesting,
            vectorize=False,
        )  # fmt: skip
        replaying = _ReplayParticles(case.guide, vectorized.guide_trace, natural.guide_trace, 0)
        sequential = trace_particles(
            case.model, replaying, case.args, {}, num_particles=k, plate_nesting=case.nesting,
            vectorize=False,
        )  # fmt: skip
    torch.testing.assert_close(sequential.log_p, vectorized.log_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequential.log_q, vectorized.log_q, rtol=1e-5, atol=1e-5)
    assert sequential.scale == pytest.approx(vectorized.scale)
