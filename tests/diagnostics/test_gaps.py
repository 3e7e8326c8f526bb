"""Inference gaps on probabilistic PCA, where every term is closed form.

PPCA (``models.ppca``): z ~ N(0, I_2), x | z ~ N(W z, s^2 I_5) with correlated columns of W, so
the posterior N(mu_n, Lambda^-1) is correlated and the best factorized Gaussian (mean mu_n,
variances 1 / Lambda_jj) leaves the closed-form approximation gap
(sum_j log Lambda_jj - log det Lambda) / 2 > 0. The encoder is deliberately mis-scaled
(mean 0.7 mu_n, scales 1.5 times the best ones), so its amortization gap is large and closed form
too (``PPCA.gaussian_elbo``). Tolerances: 4 Monte Carlo standard errors, plus the fit's
convergence tolerance where a fitted ELBO enters (a fit stops within ``FIT_TOLERANCE`` nats per
point of its optimum, and only from below).
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from models.ppca import build_ppca, make_linear_gaussian_guide
from pyro_vi_ext.diagnostics import InferenceGaps, inference_gaps, plot_inference_gaps

NUM_POINTS = 24
FIT_TOLERANCE = 2e-3
MEAN_FACTOR, SCALE_FACTOR = 0.7, 1.5
FAST_FIT = dict(
    learning_rate=0.1,
    check_every=25,
    max_steps=1500,
    tolerance=1e-3,
    num_fit_particles=32,
    num_evidence_samples=2000,
    num_elbo_samples=2000,
    sample_chunk_size=2000,
)


@pytest.fixture(scope="module")
def ppca():
    """PPCA with a 2-D code and strongly correlated loadings (posterior correlation -0.94)."""
    return build_ppca(x_dim=5, z_dim=2, noise_scale=0.5, column_correlation=0.9, seed=0)


@pytest.fixture(scope="module")
def data(ppca):
    """Draw data points from the model's own evidence."""
    return ppca.sample(NUM_POINTS, seed=1)


def _misscaled_guide(ppca):
    a, b = ppca.posterior_mean_map()
    return make_linear_gaussian_guide(
        MEAN_FACTOR * a, b, SCALE_FACTOR * ppca.best_factorized_scale()
    )


@pytest.fixture(scope="module")
def one_thread():
    """Run the module-scoped fit on one thread (the autouse fixture is per test, set up later).

    Its tensors are tiny: on a busy two-core machine a multi-threaded op costs ~10 ms of
    synchronization, ten times the op.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gaps(ppca, data, one_thread) -> InferenceGaps:
    """Decompose the mis-scaled encoder's gaps, with the full-covariance family."""
    pyro.set_rng_seed(0)
    return inference_gaps(
        ppca.model,
        _misscaled_guide(ppca),
        data,
        richer_family="full_covariance",
        iw_num_particles=10,
        **FAST_FIT,
    )


def _within(estimate: float, exact: float, se: float, slack: float = 0.0) -> bool:
    return abs(estimate - exact) <= 4.0 * se + slack


def test_log_evidence_matches_closed_form_per_point(ppca, data, gaps):
    """Importance-sampled log p(x_n) is the Gaussian evidence, point by point."""
    exact = ppca.log_evidence(data).numpy()
    assert gaps.log_evidence.shape == (NUM_POINTS,)
    assert np.all(np.abs(gaps.log_evidence - exact) <= 4.0 * gaps.log_evidence_se + 1e-6)


def test_approximation_gap_matches_closed_form(ppca, gaps):
    """Mean approximation gap equals (sum log Lambda_jj - log det Lambda) / 2."""
    exact = float(ppca.approximation_gap())
    assert exact > 0.5  # the correlated posterior makes the test meaningful
    mean, se = gaps.table()["approximation gap"]
    assert _within(mean, exact, se, FIT_TOLERANCE), (mean, se, exact)


def test_amortization_gap_of_misscaled_encoder_matches_closed_form(ppca, data, gaps):
    """The encoder's gap to the best factorized member equals its closed form."""
    best = ppca.gaussian_elbo(
        data, ppca.posterior_mean(data), torch.diag(ppca.best_factorized_scale() ** 2)
    )
    amortized_scale = SCALE_FACTOR * ppca.best_factorized_scale()
    amortized = ppca.gaussian_elbo(
        data, MEAN_FACTOR * ppca.posterior_mean(data), torch.diag(amortized_scale**2)
    )
    exact = float((best - amortized).mean())
    mean, se = gaps.table()["amortization gap"]
    assert exact > 1.0
    assert _within(mean, exact, se, FIT_TOLERANCE), (mean, se, exact)
    # the amortized ELBO needs no fit: per point within 4 standard errors
    assert np.all(np.abs(gaps.amortized_elbo - amortized.numpy()) <= 4.0 * gaps.amortized_elbo_se)


def test_full_covariance_family_closes_the_approximation_gap(gaps):
    """The full-covariance fit reaches log p(x): PPCA's posterior is Gaussian."""
    mean, se = gaps.table()["gap left by full_covariance"]
    assert -4.0 * se <= mean <= 4.0 * se + FIT_TOLERANCE, (mean, se)
    assert gaps.fraction_closed == pytest.approx(1.0, abs=0.01)
    assert gaps.richer_converged.all() and gaps.family_converged.all()
    assert gaps.evidence_proposal == "richer" and gaps.evidence_khat.max() < 0.5


def test_bounds_are_ordered(gaps):
    """ELBO < IWAE_10 < log p(x), and the two gaps sum to the inference gap."""
    table = gaps.table()
    log_p = table["log p(x)"][0]
    iwae = table["IWAE (K=10), amortized"][0]
    elbo = table["ELBO, amortized"][0]
    assert elbo < iwae < log_p
    assert table["ELBO, best in family"][0] < log_p
    np.testing.assert_allclose(gaps.inference_gap, gaps.approximation_gap + gaps.amortization_gap)


def test_table_repr_string_and_plots(gaps):
    """Table text, short repr, stacked bars (3 per point) and the histogram."""
    text = str(gaps)
    assert "approximation gap" in text and "closes" in text
    assert repr(gaps).startswith("InferenceGaps(points=24, approximation_gap=")
    ax = gaps.plot(kind="bars", max_points=10)
    assert len(ax.patches) == 30  # left, closed and amortization bars for 10 points
    ax = plot_inference_gaps(gaps, kind="hist")
    assert ax.get_xlabel() == "nats"
    with pytest.raises(ValueError, match="kind"):
        gaps.plot(kind="pie")


def test_exact_encoder_has_no_amortization_gap(ppca):
    """An encoder that outputs the best member has no amortization gap."""
    data = ppca.sample(8, seed=2)
    a, b = ppca.posterior_mean_map()
    guide_scale = ppca.best_factorized_scale()
    guide = make_linear_gaussian_guide(a, b, guide_scale)
    pyro.set_rng_seed(1)
    # two chunks of 4 points: the per-point order must survive chunking
    with pytest.warns(UserWarning, match="k-hat above 0.7"):
        result = inference_gaps(ppca.model, guide, data, point_chunk_size=4, **FAST_FIT)
    best = ppca.gaussian_elbo(data, ppca.posterior_mean(data), torch.diag(guide_scale**2))
    error = np.abs(result.family_elbo - best.numpy())
    assert np.all(error <= 4.0 * result.family_elbo_se + FIT_TOLERANCE)
    # the factorized proposal is too narrow along the posterior's correlated direction: its
    # importance weights are heavy-tailed, and the result says so
    assert result.evidence_khat.max() > 0.7
    mean, se = result.table()["amortization gap"]
    assert -4.0 * se - FIT_TOLERANCE <= mean <= 4.0 * se, (mean, se)
    assert result.richer_elbo is None and result.fraction_closed is None
    ax = result.plot(kind="bars")
    assert len(ax.patches) == 16  # approximation and amortization bars for 8 points


def test_vae_networks_are_left_untouched():
    """A VAE's encoder and decoder keep their values and get no gradient; shapes are per point."""
    from models.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(x_dim=6, hidden_dim=8, z_dim=2, name="tiny")
    x = (torch.rand(5, 6) < 0.4).float()
    before = [p.detach().clone() for p in vae.parameters()]
    result = inference_gaps(
        vae.model,
        vae.guide,
        x,
        richer_family="full_covariance",
        max_steps=20,
        check_every=10,
        num_elbo_samples=20,
        num_evidence_samples=50,
        check_evidence_tail=False,
    )
    assert result.family_elbo.shape == (5,) and result.richer_elbo.shape == (5,)
    assert result.evidence_khat is None and not result.family_converged.any()
    assert np.all(result.family_steps == 20)
    for param, value in zip(vae.parameters(), before, strict=True):
        assert param.grad is None
        torch.testing.assert_close(param.detach(), value)


def test_refuses_a_guide_site_that_is_not_normal(ppca, data):
    """A Laplace guide site is refused with its name."""

    def laplace_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.Laplace(torch.zeros(x.shape[0], 2, dtype=x.dtype), 1.0).to_event(1)
            )

    with pytest.raises(ValueError, match="Guide site 'z' is Independent"):
        inference_gaps(
            ppca.model,
            laplace_guide,
            data[:4],
            max_steps=5,
            num_elbo_samples=10,
            num_evidence_samples=10,
        )


def test_refuses_global_latents():
    """A model with a global latent has no per-point gaps and is refused."""

    def model(x):
        mean = pyro.sample("mean", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mean, 1.0), obs=x)

    def guide(x):
        pyro.sample("mean", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="global latents"):
        inference_gaps(
            model, guide, torch.randn(6), max_steps=5, num_elbo_samples=10, num_evidence_samples=10
        )


def test_full_covariance_needs_a_vector_latent():
    """The full-covariance family refuses a scalar latent site."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.7))

    with pytest.raises(ValueError, match="Guide site 'z' has 0 event dims"):
        inference_gaps(
            model,
            guide,
            torch.randn(6),
            richer_family="full_covariance",
            max_steps=50,
            check_every=10,
            num_elbo_samples=10,
            num_evidence_samples=10,
        )


def test_rejects_bad_arguments(ppca, data):
    """Invalid options fail before any computation, naming the option."""
    guide = _misscaled_guide(ppca)
    with pytest.raises(ValueError, match="richer_family"):
        inference_gaps(ppca.model, guide, data, richer_family="flow")
    with pytest.raises(ValueError, match="fewer than 2 independent IWAE bounds"):
        inference_gaps(ppca.model, guide, data, iw_num_particles=50, num_elbo_samples=60)
    with pytest.raises(ValueError, match="needs a richer_family"):
        inference_gaps(ppca.model, guide, data, evidence_proposal="richer")
    with pytest.raises(ValueError, match="number of rows"):
        inference_gaps(ppca.model, guide, (data, data[:3]))
