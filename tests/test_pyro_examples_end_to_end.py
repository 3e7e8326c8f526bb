"""Pyro's own tutorial and example models, unchanged, from training to the ArviZ export.

Each model is written as in Pyro's tutorials (no ``idx=``, no ``n_data=``, no broadcasting
edits): the Bayesian-regression tutorial (``PyroModule[nn.Linear]`` with ``PyroSample``
weights, an ``AutoDiagonalNormal`` guide), the Gaussian-mixture tutorial (model-side
``config_enumerate``, ``locs[assignment]`` indexing, an autoguide over the continuous globals)
and the VAE example (``pyro.module``'d networks, local latents). Each trains with
:class:`~pyro_vi_ext.ImportanceWeightedELBO` in ``pyro.infer.SVI`` and in ``fit`` on minibatches
(``data_plate="data"``), and the diagnostics and the export run on the fitted guide. Sizes are
small so that each test takes a few seconds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, config_enumerate
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.diagnostics import (
    ParticleFallbackWarning,
    importance_resample,
    log_evidence,
    psis_diagnostic,
    to_inference_data,
)
from pyro_vi_ext.infer._weights import ParticleVectorizationError, trace_particles
from pyro_vi_ext.training import fit
from tests.infer.test_pyro_examples import VAE, X_DIM, Z_DIM, _images
from tests.infer.toy_models import single_thread  # noqa: F401 (a fixture)
from tests.training._problems import regression_data
from tests.training.test_data_plate import plain_guide, plain_model_len

pytestmark = pytest.mark.usefixtures("single_thread")


def _decreased(losses) -> bool:
    """Whether the last fifth of a loss history averages below the first fifth."""
    losses = np.asarray(losses, dtype=float)
    fifth = max(len(losses) // 5, 1)
    return bool(losses[-fifth:].mean() < losses[:fifth].mean())


def _assert_diagnostics(
    model, guide, args, vectorize, expected_latents, point_dim, num_points, draws=200
):
    """Run evidence, k-hat, resampling and the export; check they are finite and shaped right."""
    options = dict(vectorize_particles=vectorize, max_plate_nesting=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParticleFallbackWarning)  # the path is chosen explicitly
        evidence = log_evidence(model, guide, *args, num_samples=draws, chunk_size=100, **options)
        psis = psis_diagnostic(model, guide, *args, num_samples=draws, chunk_size=100, **options)
        resampled = importance_resample(
            model, guide, *args, num_samples=50, num_proposals=draws, **options
        )
        idata = to_inference_data(model, guide, *args, num_samples=60, chunk_size=30, **options)
    assert np.isfinite(evidence.total) and np.isfinite(evidence.total_se)
    assert evidence.total_se > 0
    assert np.all(np.isfinite(psis.khat))
    assert set(resampled.samples) == set(expected_latents)
    assert all(value.shape[0] == 50 for value in resampled.samples.values())
    assert set(idata.posterior.data_vars) == set(expected_latents)
    assert idata.posterior.sizes["draw"] == 60
    for group in ("posterior_predictive", "log_likelihood", "observed_data"):
        variable = getattr(idata, group)["obs"]
        assert variable.sizes[point_dim] == num_points, group
    assert np.all(np.isfinite(idata.log_likelihood["obs"].values))
    assert np.isfinite(idata.posterior.attrs["psis_khat"])
    return evidence, idata


# -- (a) the Bayesian-regression tutorial ------------------------------------------------------
class BayesianRegression(PyroModule):
    """Pyro's Bayesian-regression tutorial model, as written there."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2)
        )
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        """Run the regression with a Uniform noise scale."""
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            obs = pyro.sample("obs", dist.Normal(mean, sigma), obs=y)  # noqa: F841 (as written)
        return mean


def _regression_tutorial_data(n=40):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(n, generator=generator)
    return x, y


REGRESSION_SITES = {"sigma", "linear.weight", "linear.bias"}


@pytest.mark.parametrize(
    "num_particles, vectorize", [(1, True), (4, False)], ids=["k1", "k4-sequential"]
)
def test_bayesian_regression_tutorial_in_svi(num_particles, vectorize):
    """Check: SVI trains the tutorial model unchanged; the bound stays at least the ELBO."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = _regression_tutorial_data()
    model = BayesianRegression(3, 1)
    guide = AutoDiagonalNormal(model)
    loss = ImportanceWeightedELBO(
        num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    losses = [svi.step(x, y) for _ in range(100)]
    assert _decreased(losses)
    assert loss.last_terms[loss.bound_term] >= loss.last_terms["elbo"] - 1e-4
    _assert_diagnostics(model, guide, (x, y), False, REGRESSION_SITES, "data", 40, draws=100)


def test_bayesian_regression_tutorial_in_fit_on_minibatches():
    """Check: fit(data_plate="data") trains it on minibatches at K = 1; K > 1 is refused clearly.

    With a global latent (the weights) under subsampling only K = 1 is unbiased; the K > 1
    refusal must say so before any step.
    """
    pyro.clear_param_store()
    x, y = _regression_tutorial_data()
    model = BayesianRegression(3, 1)
    guide = AutoDiagonalNormal(model)
    loss = ImportanceWeightedELBO(num_particles=1, max_plate_nesting=1)
    result = fit(model, guide, (x, y), loss, pyro.optim.Adam({"lr": 0.05}), num_epochs=40,
                 batch_size=10, seed=0, data_plate="data", progress=False)  # fmt: skip
    assert _decreased(result.history["loss_total"])
    evidence, idata = _assert_diagnostics(
        model, guide, (x, y), False, REGRESSION_SITES, "data", 40, draws=100
    )
    posterior_sigma = float(idata.posterior["sigma"].mean())
    assert 0.3 < posterior_sigma < 1.0, posterior_sigma  # the data's noise scale is 0.5
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(model)
    wide = ImportanceWeightedELBO(num_particles=4, vectorize_particles=False, max_plate_nesting=1)
    with pytest.raises(ValueError, match=r"Plate .data. is subsampled.*num_particles=1"):
        fit(model, guide, (x, y), wide, pyro.optim.Adam({"lr": 0.05}), num_steps=2,
            batch_size=10, seed=0, data_plate="data", progress=False)  # fmt: skip


def test_bayesian_regression_tutorial_diagnostics_fall_back_by_themselves():
    """Check: with the default "auto", the diagnostics warn once and run sequentially."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = _regression_tutorial_data()
    model = BayesianRegression(3, 1)
    guide = AutoDiagonalNormal(model)
    pyro.infer.Trace_ELBO().loss(model, guide, x, y)  # creates the guide's parameters
    with pytest.warns(ParticleFallbackWarning, match="linear"):
        idata = to_inference_data(model, guide, x, y, num_samples=20)
    assert idata.posterior["linear.weight"].shape == (1, 20, 1, 3)
    assert idata.posterior_predictive["obs"].shape == (1, 20, 40)


# -- (b) the Gaussian-mixture tutorial ---------------------------------------------------------
K_COMPONENTS = 2


@config_enumerate
def gmm_model(data):
    """Pyro's GMM tutorial model: global weights, scale and locs; assignment enumerated."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K_COMPONENTS)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


GMM_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, 0.5, 10.5, 11.5])
GMM_SITES = {"weights", "scale", "locs"}


def _gmm_guide():
    """Return an autoguide over the continuous globals (the tutorial's AutoDelta, with spread)."""
    return AutoNormal(poutine.block(gmm_model, expose=sorted(GMM_SITES)), init_scale=0.1)


def _init_gmm_locs(guide):
    """Start the components apart, as the tutorial's init does (its data are well separated)."""
    guide(GMM_DATA)
    with torch.no_grad():
        guide.locs.locs.copy_(torch.tensor([0.5, 11.0]))


@pytest.mark.parametrize(
    "num_particles, vectorize", [(1, True), (4, False)], ids=["k1", "k4-sequential"]
)
def test_gmm_tutorial_with_enumeration_in_svi(num_particles, vectorize):
    """Check: the enumerated mixture trains and is diagnosed with the assignment summed out."""
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = _gmm_guide()
    _init_gmm_locs(guide)
    loss = ImportanceWeightedELBO(
        num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1
    )
    svi = SVI(gmm_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    losses = [svi.step(GMM_DATA) for _ in range(60)]
    assert _decreased(losses)
    evidence, idata = _assert_diagnostics(gmm_model, guide, (GMM_DATA,), False, GMM_SITES,
                                          "data", len(GMM_DATA), draws=60)  # fmt: skip
    assert "assignment" not in idata.posterior
    locs = np.sort(idata.posterior["locs"].values.mean((0, 1)))
    assert abs(locs[0] - 0.5) < 1.0 and abs(locs[1] - 11.0) < 1.0, locs


def test_gmm_tutorial_in_fit_on_minibatches():
    """Check: fit(data_plate="data", batch_size=4) trains the mixture at K = 1."""
    pyro.clear_param_store()
    guide = _gmm_guide()
    _init_gmm_locs(guide)
    loss = ImportanceWeightedELBO(num_particles=1, max_plate_nesting=1)
    result = fit(gmm_model, guide, GMM_DATA, loss, pyro.optim.Adam({"lr": 0.05}), num_epochs=30,
                 batch_size=4, seed=0, data_plate="data", progress=False)  # fmt: skip
    assert _decreased(result.history["loss_total"])
    with pytest.warns(ParticleFallbackWarning, match="Shape mismatch"):  # the default "auto"
        evidence = log_evidence(gmm_model, guide, GMM_DATA, num_samples=40)
    assert evidence.point_plates == () and np.isfinite(evidence.total)  # global latents
    idata = to_inference_data(gmm_model, guide, GMM_DATA, num_samples=30,
                              vectorize_particles=False)  # fmt: skip
    assert idata.posterior["locs"].dims == ("chain", "draw", "components")
    assert idata.posterior_predictive["obs"].dims == ("chain", "draw", "data")
    assert idata.log_likelihood["obs"].shape == (1, 30, len(GMM_DATA))


def test_vectorized_gmm_tutorial_raises_the_vectorization_error_in_trace_particles():
    """Report: trace_particles should say the model does not broadcast (it blames nothing)."""
    pyro.clear_param_store()
    guide = _gmm_guide()
    _init_gmm_locs(guide)
    with pytest.raises(ParticleVectorizationError):
        trace_particles(gmm_model, guide, (GMM_DATA,), {}, num_particles=4, plate_nesting=1)


def test_vectorized_loss_on_the_gmm_tutorial_suggests_the_sequential_path():
    """Report: the vectorized loss should suggest vectorize_particles=False here."""
    pyro.clear_param_store()
    guide = _gmm_guide()
    _init_gmm_locs(guide)
    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    with pytest.raises(ParticleVectorizationError):
        loss.loss(gmm_model, guide, GMM_DATA)


# -- (c) the VAE example -----------------------------------------------------------------------
def test_vae_example_in_svi_and_fit_with_vectorized_diagnostics():
    """Check: the VAE trains in SVI and in fit on minibatches at K = 5 (local latents).

    Its networks broadcast over the particle dim, so the default "auto" stays vectorized: no
    fallback warning. The evidence is at least the ELBO on the same data (IWAE_S >= ELBO in
    expectation; here by far more than the noise).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE()
    x = _images()
    loss = ImportanceWeightedELBO(num_particles=5)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.02}), loss=loss)
    losses = [svi.step(x[i % 3 * 8 : i % 3 * 8 + 8]) for i in range(30)]
    assert _decreased(losses)
    result = fit(vae.model, vae.guide, x, ImportanceWeightedELBO(num_particles=5),
                 pyro.optim.Adam({"lr": 0.02}), num_epochs=10, batch_size=8, seed=0,
                 data_plate="data", progress=False)  # fmt: skip
    assert _decreased(result.history["loss_total"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParticleFallbackWarning)
        evidence = log_evidence(vae.model, vae.guide, x, num_samples=300, chunk_size=100)
        psis = psis_diagnostic(vae.model, vae.guide, x, num_samples=300, chunk_size=100)
        resampled = importance_resample(vae.model, vae.guide, x, num_samples=20)
        idata = to_inference_data(vae.model, vae.guide, x, num_samples=40)
    assert evidence.point_plates == ("data",) and evidence.num_points == len(x)
    assert np.all(np.isfinite(evidence.per_point)) and np.all(evidence.per_point_se > 0)
    elbo = -ImportanceWeightedELBO(num_particles=1).loss(vae.model, vae.guide, x)
    assert evidence.total > elbo - 3 * evidence.total_se
    assert psis.khat.shape == (len(x),)
    assert resampled.samples["latent"].shape == (20, len(x), Z_DIM)
    assert idata.posterior["latent"].dims == ("chain", "draw", "data", "latent_dim_0")
    assert idata.posterior_predictive["obs"].shape == (1, 40, len(x), X_DIM)
    assert idata.log_likelihood["obs"].shape == (1, 40, len(x))


# -- the conjugate regression: unmodified model, minibatches, K = 1 ----------------------------
def test_unmodified_conjugate_regression_reaches_the_exact_posterior_at_k1():
    """fit(data_plate="data") with ImportanceWeightedELBO(num_particles=1) on N/5 minibatches.

    K = 1 accepts a global latent under subsampling (it is the ELBO, unbiased): the fitted
    Gaussian guide must reach the exact posterior, which only happens with the right N/B (a
    wrong factor makes the variances 5x off). Same schedule and tolerances as the Trace_ELBO
    test in tests/training/test_data_plate.py, with one particle instead of four.
    """
    x, y, mean, cov = regression_data(n=250)
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05, "betas": (0.9, 0.99)},
         "gamma": 0.97}
    )  # fmt: skip
    loss = ImportanceWeightedELBO(num_particles=1, max_plate_nesting=1)
    result = fit(plain_model_len, plain_guide, (x, y), loss, optim, num_epochs=100, batch_size=50,
                 seed=0, data_plate="data", progress=False)  # fmt: skip
    q_cov = result.params["scale_tril"] @ result.params["scale_tril"].T
    sd = cov.diag().sqrt()
    assert torch.all(((result.params["loc"] - mean) / sd).abs() < 0.25)
    assert torch.all((q_cov.diag() / cov.diag() - 1).abs() < 0.35), q_cov.diag() / cov.diag()
