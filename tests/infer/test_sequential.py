"""Sequential particles (``vectorize_particles=False``) against the vectorized path.

On the same draws (a guide whose reparameterized noise is taken from a fixed bank, row ``k`` for
particle ``k``) both paths give the same values and gradients; the loop keeps one minibatch for all
particles; one particle adds no particle plate; a model that does not broadcast fails under the
vectorized plate with an error naming the site, and runs sequentially.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_vi_ext import ImportanceWeightedELBO, RenyiAlphaELBO
from pyro_vi_ext.infer._weights import ParticleVectorizationError, trace_particles
from tests.infer.toy_models import single_thread  # noqa: F401 (a fixture)

N, D = 8, 2
MU = torch.tensor([0.5, -1.0])
pytestmark = pytest.mark.usefixtures("single_thread")


class NoiseBankNormal(dist.Normal):
    """A Normal whose draw is ``loc + scale * noise`` for a given standard-normal ``noise``."""

    def __init__(self, loc, scale, noise, reparameterized=True, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.noise = noise
        self.reparameterized = reparameterized

    @property
    def has_rsample(self):
        """Return whether draws carry a gradient."""
        return self.reparameterized

    def expand(self, batch_shape, _instance=None):
        """Return the distribution expanded to ``batch_shape`` (noise too)."""
        shape = torch.Size(batch_shape)
        return NoiseBankNormal(
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.noise.expand(shape),
            self.reparameterized,
        )

    def rsample(self, sample_shape=()):
        """Return ``loc + scale * noise``."""
        return self.loc + self.scale * self.noise

    def sample(self, sample_shape=()):
        """Return the draw without gradient."""
        return self.rsample(sample_shape).detach()


class NoiseBank:
    """Rows of fixed noise: all of them for a vectorized run, one per call on the loop."""

    def __init__(self, noise: torch.Tensor, vectorized: bool):
        self.noise, self.vectorized, self.calls = noise, vectorized, 0

    def next(self) -> torch.Tensor:
        """Return all rows (vectorized) or the next row (loop)."""
        if self.vectorized:
            return self.noise
        row = self.noise[self.calls % self.noise.shape[0]]
        self.calls += 1
        return row


def make_model():
    """Return the toy model with a learned prior mean ``mu``."""

    def model(x, idx, bank, reparameterized=True):
        mu = pyro.param("mu", MU.clone())
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    return model


def guide(x, idx, bank, reparameterized=True):
    """Guide drawing z from the noise bank (row k for particle k)."""
    a = pyro.param("A", torch.full((D,), 0.8))
    b = pyro.param("b", torch.zeros(D))
    s = pyro.param("s", torch.full((D,), 0.9), constraint=constraints.positive)
    with pyro.plate("data", N, subsample=idx):
        noise = bank.next()
        loc = (a * x + b).expand(noise.shape)
        pyro.sample(
            "z", NoiseBankNormal(loc, s.expand(noise.shape), noise, reparameterized).to_event(1)
        )


def _data():
    return MU + 1.4 * torch.randn(N, D, generator=torch.Generator().manual_seed(0))


def _value_and_grads(loss, x, idx, noise, vectorized, reparameterized=True):
    pyro.clear_param_store()
    bank = NoiseBank(noise, vectorized)
    value = loss.differentiable_loss(make_model(), guide, x, idx, bank, reparameterized)
    names = ["mu", "A", "b", "s"]
    params = [pyro.get_param_store().get_param(n).unconstrained() for n in names]
    grads = torch.autograd.grad(value, params)
    return float(value.detach()), dict(zip(names, grads, strict=True))


LOSSES = [
    (ImportanceWeightedELBO, {"estimator": e, "variant": v, "num_outer": m})
    for e in ("iwae", "stl", "dreg")
    for v, m in (("iwae", 1), ("ciwae", 1), ("piwae", 2), ("iwae", 2))
] + [(RenyiAlphaELBO, {"estimator": e, "alpha": 0.5, "num_outer": 2}) for e in ("iwae", "dreg")]


@pytest.mark.parametrize("subsample", [False, True], ids=["full", "minibatch"])
@pytest.mark.parametrize("cls, kwargs", LOSSES, ids=lambda v: str(v))
def test_sequential_equals_vectorized_on_the_same_draws(cls, kwargs, subsample):
    """Check: sequential equals vectorized on the same draws."""
    x_all = _data()
    idx = torch.tensor([1, 4, 6]) if subsample else torch.arange(N)
    x = x_all[idx]
    k = 3
    total = k * kwargs["num_outer"]
    noise = torch.randn(total, len(idx), D, generator=torch.Generator().manual_seed(1))
    loss_vec = cls(num_particles=k, max_plate_nesting=1, **kwargs)
    loss_seq = cls(num_particles=k, max_plate_nesting=1, vectorize_particles=False, **kwargs)
    value_vec, grads_vec = _value_and_grads(loss_vec, x, idx, noise, True)
    value_seq, grads_seq = _value_and_grads(loss_seq, x, idx, noise, False)
    assert value_seq == pytest.approx(value_vec, rel=1e-5)
    for name in grads_vec:
        torch.testing.assert_close(grads_seq[name], grads_vec[name], rtol=1e-4, atol=1e-5)
    assert loss_seq.last_terms == pytest.approx(loss_vec.last_terms, rel=1e-5)


def test_sequential_score_function_gradient_equals_vectorized():
    """Check: sequential score function gradient equals vectorized."""
    x = _data()
    idx = torch.arange(N)
    noise = torch.randn(4, N, D, generator=torch.Generator().manual_seed(2))
    results = []
    for vectorize in (True, False):
        loss = ImportanceWeightedELBO(
            num_particles=4, max_plate_nesting=1, vectorize_particles=vectorize
        )
        results.append(_value_and_grads(loss, x, idx, noise, vectorize, reparameterized=False))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-4, atol=1e-5)
    assert results[0][1]["A"].abs().sum() > 0  # the score term reaches the guide


def test_sequential_particles_share_one_minibatch():
    """Check: sequential particles share one minibatch."""
    seen = []
    x = _data()

    def model(batch_size):
        with pyro.plate("data", N, subsample_size=batch_size) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])

    def minibatch_guide(batch_size):
        loc = pyro.param("loc", torch.zeros(N, D))
        with pyro.plate("data", N, subsample_size=batch_size) as idx:
            seen.append(idx.clone())
            pyro.sample("z", dist.Normal(loc[idx], 1.0).to_event(1))

    loss = ImportanceWeightedELBO(num_particles=6, max_plate_nesting=1, vectorize_particles=False)
    loss.loss(model, minibatch_guide, 3)
    assert len(seen) == 6
    assert all(torch.equal(idx, seen[0]) for idx in seen)
    # a new call draws a new minibatch
    loss.loss(model, minibatch_guide, 3)
    assert len(seen) == 12 and all(torch.equal(idx, seen[6]) for idx in seen[6:])


def test_model_only_subsampled_plate_is_replayed_too():
    """A guide with only a global latent: the model's own subsample indices are replayed."""
    seen = []
    x = torch.linspace(-1.0, 1.0, N)

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N) as idx:
            seen.append(idx.clone())
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def global_guide():
        pyro.sample("z", dist.Normal(pyro.param("q", torch.tensor(0.0)), 1.0))

    loss = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1, vectorize_particles=False)
    assert torch.isfinite(torch.tensor(loss.loss(model, global_guide)))
    assert len(seen) == 3


# -- one particle: no particle plate; models that do not broadcast ---------------------------
class BayesianRegression(PyroModule):
    """Pyro's Bayesian-regression tutorial model, unchanged."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2)
        )
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        """Run the model or guide."""
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


def _regression_data():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(20, generator=generator)
    return x, y


def test_bayesian_regression_tutorial_at_k1_equals_trace_elbo():
    """Check: bayesian regression tutorial at k1 equals trace elbo."""
    x, y = _regression_data()
    model = BayesianRegression(3, 1)
    auto_guide = AutoDiagonalNormal(model)
    pyro.set_rng_seed(0)
    Trace_ELBO().loss(model, auto_guide, x, y)  # builds the autoguide's parameters
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    pyro.set_rng_seed(4)
    ours = ImportanceWeightedELBO(max_plate_nesting=1).differentiable_loss(model, auto_guide, x, y)
    pyro.set_rng_seed(4)
    theirs = Trace_ELBO().differentiable_loss(model, auto_guide, x, y)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    for mine, expected in zip(
        torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params), strict=True
    ):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)


def test_bayesian_regression_vectorized_error_names_the_site_and_sequential_trains():
    """Check: bayesian regression vectorized error names the site and sequential trains."""
    x, y = _regression_data()
    model = BayesianRegression(3, 1)
    auto_guide = AutoDiagonalNormal(model)
    vectorized = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    with pytest.raises(ParticleVectorizationError, match=r"model failed after site 'linear\.\w+'"):
        vectorized.loss(model, auto_guide, x, y)
    with pytest.raises(RuntimeError, match="vectorize_particles=False"):
        vectorized.loss(model, auto_guide, x, y)
    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1, vectorize_particles=False)
    svi = pyro.infer.SVI(model, auto_guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    losses = [svi.step(x, y) for _ in range(40)]
    assert sum(losses[-10:]) < sum(losses[:10])
    assert loss.last_terms["ess"] <= 4.0


def test_k1_adds_no_particle_plate():
    """Check: k1 adds no particle plate."""
    shapes = []

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        shapes.append(z.shape)

    def scalar_guide():
        pyro.sample("z", dist.Normal(pyro.param("q", torch.tensor(0.2)), 1.0))

    ImportanceWeightedELBO(max_plate_nesting=0).loss(model, scalar_guide)
    RenyiAlphaELBO(max_plate_nesting=0).loss(model, scalar_guide)
    assert shapes == [torch.Size([]), torch.Size([])]


def test_trace_particles_sequential_layout_matches_vectorized():
    """Check: trace particles sequential layout matches vectorized."""
    x = _data()
    idx = torch.arange(N)
    noise = torch.randn(5, N, D, generator=torch.Generator().manual_seed(5))
    out = {}
    for vectorize in (True, False):
        pyro.clear_param_store()
        out[vectorize] = trace_particles(
            make_model(),
            guide,
            (x, idx, NoiseBank(noise, vectorize)),
            {},
            num_particles=5,
            plate_nesting=1,
            vectorize=vectorize,
        )
    assert out[False].log_weights.shape == out[True].log_weights.shape == (5, N)
    torch.testing.assert_close(out[False].log_weights, out[True].log_weights)
    assert len(out[False].runs) == 5 and len(out[True].runs) == 1
    assert not out[False].vectorized and out[False].point_plates == out[True].point_plates
