"""ImportanceWeightedELBO with Pyro's machinery.

SVI, autoguides, PyroModules, ``pyro.module``'d ``nn.Module`` encoders, and ``ELBOModule`` trained
by a plain ``torch.optim.Adam``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyro_vi_ext import ImportanceWeightedELBO
from tests.infer.toy_models import (
    EXACT_S,
    make_toy_guide,
    single_thread,  # noqa: F401 (a fixture)
    toy_data,
    toy_guide_params,
    toy_log_evidence,
    toy_log_weights,
    toy_model,
)

D = 3
N = 10
MU = torch.tensor([0.5, -1.0, 2.0])
ESTIMATORS = ("iwae", "stl", "dreg")
normal = torch.distributions.Normal


@pytest.fixture
def x():
    """Return the toy data set."""
    return toy_data(N, D, MU)


pytestmark = pytest.mark.usefixtures("single_thread")


def _evaluate(model, guide, *args, k=5, num_outer=200) -> float:
    """Return a precise estimate of the negative IWAE_K bound (a loss value, lower is better)."""
    with torch.no_grad():
        return ImportanceWeightedELBO(num_particles=k, num_outer=num_outer).loss(
            model, guide, *args
        )


def _grad_size(parameters) -> float:
    return max((float(p.grad.abs().max()) for p in parameters if p.grad is not None), default=0.0)


# -- SVI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_svi_training_reduces_the_loss_and_finds_the_posterior(x, estimator):
    """Check: svi training reduces the loss and finds the posterior."""
    guide = make_toy_guide(toy_guide_params(D, MU, exact=False))
    loss = ImportanceWeightedELBO(num_particles=5, estimator=estimator)
    svi = SVI(toy_model, guide, pyro.optim.Adam({"lr": 0.03}), loss=loss)
    target = -float(toy_log_evidence(x, MU).sum())
    before = _evaluate(toy_model, guide, x, MU)
    store = pyro.get_param_store()
    averages = {"A": 0.0, "s": 0.0}
    # 400 steps, iterates averaged over the last 200: one iterate's minibatch noise is about the
    # size of the tolerance (over seeds 0-4 the averaged error is at most 0.11 for "iwae")
    for step in range(400):
        value = svi.step(x, MU, 5)  # minibatches of 5 out of 10
        assert math.isfinite(value)
        if step >= 200:
            for name in averages:
                averages[name] = averages[name] + store[name].detach() / 200
    after = _evaluate(toy_model, guide, x, MU)
    assert after - target < 0.2 * (before - target)
    # the IWAE_5 optimum in this family is the exact posterior (STL's is, too: zero variance there)
    torch.testing.assert_close(averages["A"], torch.full((D,), 0.5), atol=0.15, rtol=0)
    torch.testing.assert_close(averages["s"], torch.full((D,), EXACT_S), atol=0.15, rtol=0)


# -- autoguides ----------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_auto_normal_local_latents_get_the_per_point_bound(x, estimator):
    """Check: auto normal local latents get the per point bound.

    AutoNormal keeps z in the data plate: the bound is per point. Same draws as a torch
    computation (the auxiliary z_unconstrained site is q's density; the Delta adds nothing).
    """
    loc = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    guide = AutoNormal(toy_model, init_loc_fn=init_to_value(values={"z": loc}), init_scale=0.8)
    loss = ImportanceWeightedELBO(
        num_particles=4, num_outer=2, estimator=estimator, max_plate_nesting=1
    )
    guide(x, MU)  # creates the parameters
    torch.manual_seed(2)
    value = loss.loss(toy_model, guide, x, MU)
    torch.manual_seed(2)
    z = loc + 0.8 * torch.randn(8, N, D)
    lw = toy_log_weights(x, MU, 0.0, loc, torch.tensor(0.8), z).reshape(2, 4, N)
    expected = (torch.logsumexp(lw, 1) - math.log(4)).mean(0).sum()
    assert value == pytest.approx(-float(expected), rel=1e-5)


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_auto_normal_exact_posterior_has_zero_stl_and_dreg_gradient(x, estimator):
    """Check: auto normal exact posterior has zero stl and dreg gradient."""
    exact_loc = (x + MU) / 2
    guide = AutoNormal(
        toy_model, init_loc_fn=init_to_value(values={"z": exact_loc}), init_scale=EXACT_S
    )
    guide(x, MU)
    loss = ImportanceWeightedELBO(num_particles=5, estimator=estimator)
    value = loss.loss_and_grads(toy_model, guide, x, MU)
    assert value == pytest.approx(-float(toy_log_evidence(x, MU).sum()), rel=1e-5)
    assert _grad_size(guide.parameters()) < 1e-4
    for parameter in guide.parameters():
        parameter.grad = None
    ImportanceWeightedELBO(num_particles=5).loss_and_grads(toy_model, guide, x, MU)
    assert _grad_size(guide.parameters()) > 1e-2  # the IWAE estimator's score noise


def test_auto_normal_with_subsampling_trains(x):
    """Check: auto normal with subsampling trains."""
    guide = AutoNormal(toy_model)
    loss = ImportanceWeightedELBO(num_particles=5, estimator="dreg")
    svi = SVI(toy_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    svi.step(x, MU, 5)
    target = -float(toy_log_evidence(x, MU).sum())
    before = _evaluate(toy_model, guide, x, MU)
    for _ in range(200):
        svi.step(x, MU, 5)
    after = _evaluate(toy_model, guide, x, MU)
    assert after - target < 0.2 * (before - target)


def test_auto_diagonal_normal_gets_the_whole_trace_bound(x):
    """Check: auto diagonal normal gets the whole trace bound.

    One global latent vector: no plate is shared by every site, so the bound is taken over the
    whole trace (a log-mean-exp of sums over the data), checked on the same draws.
    """
    loc = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    guide = AutoDiagonalNormal(
        toy_model, init_loc_fn=init_to_value(values={"z": loc}), init_scale=0.3
    )
    guide(x, MU)
    k, num_outer = 6, 2
    loss = ImportanceWeightedELBO(num_particles=k, num_outer=num_outer, max_plate_nesting=1)
    torch.manual_seed(4)
    value = loss.loss(toy_model, guide, x, MU)
    torch.manual_seed(4)
    eps = torch.randn(num_outer * k, 1, N * D)
    z = (loc.reshape(-1) + 0.3 * eps).reshape(num_outer * k, N, D)
    lw = toy_log_weights(x, MU, 0.0, loc, torch.tensor(0.3), z).sum(-1)  # whole trace
    expected = (torch.logsumexp(lw.reshape(num_outer, k), 1) - math.log(k)).mean()
    assert value == pytest.approx(-float(expected), rel=1e-5)
    # the per-point bound on the same draws is a different (larger) number
    per_point = torch.logsumexp(
        toy_log_weights(x, MU, 0.0, loc, torch.tensor(0.3), z).reshape(num_outer, k, N), 1
    )
    assert float((per_point - math.log(k)).mean(0).sum()) > float(expected) + 1.0


@pytest.mark.parametrize(
    "auto_guide, estimator",
    [
        (AutoDiagonalNormal, "dreg"),
        (AutoMultivariateNormal, "iwae"),
        (AutoMultivariateNormal, "stl"),
    ],
)
def test_global_autoguides_train_with_svi(x, auto_guide, estimator):
    """Check: global autoguides train with svi."""
    guide = auto_guide(toy_model)
    loss = ImportanceWeightedELBO(num_particles=5, estimator=estimator)
    # lr 0.02: with lr 0.1 a 30x30 scale_tril trained by STL/DReG diverges (so does a hand-written
    # torch STL on the same parametrization), while the diagonal guide converges
    svi = SVI(toy_model, guide, pyro.optim.Adam({"lr": 0.02}), loss=loss)
    svi.step(x, MU)
    before = _evaluate(toy_model, guide, x, MU, num_outer=100)
    for _ in range(100):
        svi.step(x, MU)
    assert _evaluate(toy_model, guide, x, MU, num_outer=100) < before - 5.0


@pytest.mark.parametrize("auto_guide", [AutoDiagonalNormal, AutoMultivariateNormal])
def test_global_autoguide_with_subsampling_raises_naming_the_site(x, auto_guide):
    """Check: global autoguide with subsampling raises naming the site."""
    guide = auto_guide(toy_model)
    name = f"_{auto_guide.__name__}_latent"
    loss = ImportanceWeightedELBO(num_particles=3)
    with pytest.raises(ValueError, match=rf"'data' is subsampled.*guide site '{name}'"):
        loss.loss(toy_model, guide, x, MU, 5)


# -- nn.Module encoders: detached inside log q --------------------------------------------------
def _exact_linear_encoder() -> nn.Linear:
    encoder = nn.Linear(D, D)
    with torch.no_grad():
        encoder.weight.copy_(0.5 * torch.eye(D))
        encoder.bias.copy_(MU / 2)
    return encoder


def make_module_guide(encoder: nn.Module, scale: float = EXACT_S):
    """Return a function guide with an ``nn.Module`` encoder registered by ``pyro.module``."""

    def guide(x, mu, batch_size=None):
        pyro.module("encoder", encoder)
        s = pyro.param("s", torch.full((D,), scale), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            pyro.sample("z", dist.Normal(encoder(x[idx]), s).to_event(1))

    return guide


@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_pyro_module_encoder_exact_posterior_zero_gradient(x, k, batch_size):
    """Check: pyro module encoder exact posterior zero gradient.

    Amortized linear encoder at the exact posterior (A = I/2, bias mu/2): STL and DReG leave the
    encoder and the scale with zero gradient, which needs the module's parameters detached inside
    log q; the IWAE estimator's gradient is nonzero. Parameters are restored afterwards.
    """
    encoder = _exact_linear_encoder()
    guide = make_module_guide(encoder)
    weight = encoder.weight
    sizes = {}
    for estimator in ESTIMATORS:
        encoder.zero_grad(set_to_none=True)
        for _, parameter in pyro.get_param_store().named_parameters():
            parameter.grad = None
        loss = ImportanceWeightedELBO(num_particles=k, estimator=estimator)
        value = loss.loss_and_grads(toy_model, guide, x, MU, batch_size)
        if batch_size is None:
            assert value == pytest.approx(-float(toy_log_evidence(x, MU).sum()), rel=1e-5)
        s_grad = pyro.get_param_store().get_param("s").unconstrained().grad
        sizes[estimator] = max(_grad_size(encoder.parameters()), float(s_grad.abs().max()))
        assert encoder.weight is weight and isinstance(encoder.weight, nn.Parameter)
    assert sizes["stl"] < 1e-4 and sizes["dreg"] < 1e-4
    assert sizes["iwae"] > 1e-2


class AmortizedGuide(nn.Module):
    """A guide that is itself a plain ``nn.Module`` (no ``pyro.module`` call): for ELBOModule."""

    def __init__(self, encoder: nn.Module, scale: float = EXACT_S):
        super().__init__()
        self.encoder = encoder
        self.log_scale = nn.Parameter(torch.full((D,), math.log(scale)))

    def forward(self, x, batch_size=None):
        """Run the model or guide."""
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            pyro.sample("z", dist.Normal(self.encoder(x[idx]), self.log_scale.exp()).to_event(1))


class ToyModel(PyroModule):
    """The toy model as a PyroModule with a learned prior mean."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = PyroParam(mu.clone())

    def forward(self, x, batch_size=None):
        """Run the model or guide."""
        toy_model(x, self.mu, batch_size)


class PyroGuide(PyroModule):
    """The amortized guide as a PyroModule (PyroModule[nn.Linear] encoder, PyroParam scale)."""

    def __init__(self, scale: float = EXACT_S):
        super().__init__()
        self.encoder = PyroModule[nn.Linear](D, D)
        with torch.no_grad():
            self.encoder.weight.copy_(0.5 * torch.eye(D))
            self.encoder.bias.copy_(MU / 2)
        self.scale = PyroParam(torch.full((D,), scale), constraint=constraints.positive)

    def forward(self, x, batch_size=None):
        """Run the model or guide."""
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            pyro.sample("z", dist.Normal(self.encoder(x[idx]), self.scale).to_event(1))


@pytest.mark.parametrize("guide_kind", ["nn.Module", "PyroModule"])
@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_elbo_module_exact_posterior_zero_guide_gradient(x, guide_kind, estimator):
    """Check: elbo module exact posterior zero guide gradient."""
    model = ToyModel(MU)
    guide = AmortizedGuide(_exact_linear_encoder()) if guide_kind == "nn.Module" else PyroGuide()
    elbo_module = ImportanceWeightedELBO(num_particles=8, estimator=estimator)(model, guide)
    value = elbo_module(x)
    assert float(value.detach()) == pytest.approx(-float(toy_log_evidence(x, MU).sum()), rel=1e-5)
    value.backward()
    assert _grad_size(guide.parameters()) < 1e-4
    assert _grad_size(model.parameters()) > 1e-2  # the model's own gradient is left alone
    for parameter in guide.parameters():
        assert isinstance(parameter, nn.Parameter) and parameter.requires_grad


@pytest.mark.parametrize(
    "guide_kind, estimator", [("nn.Module", "iwae"), ("PyroModule", "stl"), ("PyroModule", "dreg")]
)
def test_elbo_module_trains_with_a_plain_torch_optimizer(x, guide_kind, estimator):
    """Check: elbo module trains with a plain torch optimizer."""
    torch.manual_seed(0)
    model = ToyModel(torch.zeros(D))
    wrong = 1.3
    if guide_kind == "nn.Module":
        guide = AmortizedGuide(nn.Linear(D, D), scale=wrong)
    else:
        guide = PyroGuide(scale=wrong)
        with torch.no_grad():
            guide.encoder.weight.normal_(0.0, 0.3)
    elbo_module = ImportanceWeightedELBO(num_particles=5, estimator=estimator)(model, guide)
    elbo_module(x, 5)  # one forward first: parameters (PyroParams) exist afterwards
    optimizer = torch.optim.Adam(elbo_module.parameters(), lr=0.1)
    names = {name for name, _ in elbo_module.named_parameters()}
    assert any(name.startswith("model.") for name in names)
    assert any(name.startswith("guide.") for name in names)
    initial = [p.detach().clone() for p in elbo_module.parameters()]

    def evaluate():
        with torch.no_grad():
            return float(ImportanceWeightedELBO(num_particles=5, num_outer=300)(model, guide)(x))

    before = evaluate()
    for _ in range(150):
        optimizer.zero_grad()
        loss = elbo_module(x, 5)
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < before - 5.0
    for old, new in zip(initial, elbo_module.parameters(), strict=True):
        assert not torch.equal(old, new)
    # mu is learned toward its maximum-likelihood value, the data mean (loose: 10 points)
    torch.testing.assert_close(model.mu.detach(), x.mean(0), atol=0.6, rtol=0)
