"""PSIS k-hat, log-evidence, importance resampling and IW bounds against exact answers."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pyro
import pytest
import torch
from scipy.special import logsumexp

from models.linear_regression import (
    linear_regression_guide,
    make_exact_guide,
    make_underdispersed_guide,
    mean_field_optimum,
)
from pyro_vi_ext.diagnostics import (
    importance_resample,
    iw_bound_curve,
    log_evidence,
    psis_diagnostic,
    psis_from_log_weights,
)
from pyro_vi_ext.diagnostics._sampling import LogMeanExp
from pyro_vi_ext.infer._weights import trace_particles
from tests.diagnostics._toys import gaussian_guide


def _mean_field(regression, scale_factor: float = 1.0, shift_sd: float = 0.0):
    """Return the mean-field optimum (what Trace_ELBO converges to), optionally degraded."""
    loc, scale = mean_field_optimum(regression.x.double(), regression.y.double())
    pyro.param("linear_w_loc", (loc + shift_sd * scale).float())
    pyro.param(
        "linear_w_scale",
        (scale_factor * scale).float(),
        constraint=torch.distributions.constraints.positive,
    )
    return linear_regression_guide


# -- log-evidence --------------------------------------------------------------------------------


def test_log_evidence_exact_guide_is_exact(regression):
    """Give the exact log-evidence, with zero standard error, for the exact posterior."""
    guide = make_exact_guide(regression.x, regression.y)
    result = log_evidence(regression.model, guide, *regression.args, num_samples=2000)
    # every weight equals p(y): the estimate is exact up to float32 rounding, with no spread
    assert result.total == pytest.approx(regression.log_evidence, abs=2e-3)
    assert result.total_se < 1e-4
    assert result.ess[0] == pytest.approx(2000, rel=1e-3)
    assert result.per_point.shape == (1,) and result.point_plates == ()


def test_log_evidence_within_three_standard_errors(regression):
    """Land within three standard errors of the exact log-evidence."""
    # S = 10,000 in blocks of 1000: the estimate the issue asks for, with a mean-field guide
    guide = _mean_field(regression)
    result = log_evidence(regression.model, guide, *regression.args)
    assert result.num_samples == 10_000
    assert 0 < result.total_se < 0.05  # a real, small standard error
    assert abs(result.total - regression.log_evidence) < 3 * result.total_se
    # the evidence is above the guide's ELBO, which is below log p(y) by KL(q || p) > 0.01
    assert result.total > regression.log_evidence - 0.01


def test_log_evidence_per_point_for_local_latents(local_toy):
    """Estimate the log-evidence per data point for local latents."""
    exact = local_toy.exact_log_evidence().numpy()
    guide = local_toy.guide(scale=1.3, shift=0.1)  # over-dispersed and shifted: finite variance
    result = log_evidence(local_toy.model, guide, local_toy.x, num_samples=4000, chunk_size=700)
    assert result.point_plates == ("data",) and result.point_shape == (40,)
    assert result.per_point.shape == (40,) and result.per_point_se.shape == (40,)
    z = (result.per_point - exact) / result.per_point_se
    assert np.all(np.abs(z) < 4.5)  # 40 points: a Bonferroni-style bound
    assert np.mean(np.abs(z) < 3) >= 0.9
    assert abs(result.total - exact.sum()) < 3 * result.total_se
    assert result.total_se == pytest.approx(math.sqrt(np.sum(result.per_point_se**2)))
    assert result.mean == pytest.approx(result.total / 40)


def test_log_evidence_exact_local_guide_and_frozen_minibatch(local_toy):
    """Stay exact per point with a frozen minibatch of a subsampled plate."""
    exact = local_toy.exact_log_evidence().numpy()
    full = log_evidence(local_toy.model, local_toy.guide(), local_toy.x, num_samples=500)
    np.testing.assert_allclose(full.per_point, exact, atol=1e-3)
    # a plate that subsamples itself: one minibatch is drawn and kept for every block, so each
    # point's estimate is the exact evidence of one data point (mixing minibatches would not be)
    sub = log_evidence(
        local_toy.model, local_toy.guide(), local_toy.x, 10, num_samples=600, chunk_size=100
    )
    assert sub.per_point.shape == (10,) and sub.subsample_factor == pytest.approx(4.0)
    distance = np.abs(sub.per_point[:, None] - exact[None, :]).min(1)
    assert np.all(distance < 1e-3)


def test_log_mean_exp_streaming_matches_direct():
    """Match the direct log-mean-exp and its moments with the streaming one."""
    rng = np.random.default_rng(0)
    log_weights = np.sort(rng.normal(scale=3.0, size=(3000, 4)), axis=0)  # maxima rise per block
    log_weights[:5, 1] = -np.inf  # zero weights are allowed
    accumulator = LogMeanExp()
    for block in np.array_split(log_weights, 7):
        accumulator.update(block)
    value, se, ess = accumulator.result()
    np.testing.assert_allclose(value, logsumexp(log_weights, axis=0) - math.log(3000))
    weights = np.exp(log_weights)
    expected_se = weights.std(0, ddof=1) / (math.sqrt(3000) * weights.mean(0))
    np.testing.assert_allclose(se, expected_se, rtol=1e-10)
    np.testing.assert_allclose(ess, weights.sum(0) ** 2 / (weights**2).sum(0))


# -- PSIS ----------------------------------------------------------------------------------------


def test_khat_exact_guide_low_and_underdispersed_guide_high(regression):
    """Give a low k-hat for the exact guide and a high one for an under-dispersed guide."""
    exact = psis_diagnostic(
        regression.model, make_exact_guide(regression.x, regression.y), *regression.args
    )
    assert exact.khat.shape == (1,) and not exact.is_per_point
    assert exact.max_khat < 0.3
    assert exact.ess[0] > 0.99 * exact.num_samples
    # covariance shrunk 10x: ratios with a Pareto tail of shape 1 - 0.1 = 0.9
    bad_guide = make_underdispersed_guide(regression.x, regression.y, factor=0.1)
    bad = psis_diagnostic(regression.model, bad_guide, *regression.args, num_samples=4000)
    assert bad.max_khat > 0.7
    assert bad.ess[0] < 0.1 * bad.num_samples


def test_khat_per_point_for_local_latents(local_toy):
    """Compute k-hat per data point for local latents."""
    good = psis_diagnostic(local_toy.model, local_toy.guide(scale=1.2), local_toy.x)
    assert good.is_per_point and good.khat.shape == (40,)
    assert good.max_khat < 0.5
    # scale 0.4: per-point Pareto shape about 1 - 0.4^2 = 0.84
    bad = psis_diagnostic(local_toy.model, local_toy.guide(scale=0.4), local_toy.x)
    assert np.median(bad.khat) > 0.7
    assert bad.fraction_above(0.7) > 0.5
    assert np.all(bad.psis_ess <= bad.num_samples + 1e-6)


def test_khat_equals_arviz_psislw_on_identical_weights(regression, local_toy):
    """Agree with arviz.psislw on the same weights."""
    # the weights straight from the shared trace bookkeeping, then both k-hat computations
    guide = make_underdispersed_guide(regression.x, regression.y, factor=0.4)
    weights = trace_particles(
        regression.model, guide, regression.args, {}, num_particles=3000, plate_nesting=1
    )
    log_weights = weights.log_weights.detach().double().numpy()  # [S, 1]
    ours = psis_from_log_weights(log_weights)
    _, k_arviz = az.psislw(log_weights[:, 0].copy(), reff=1.0)
    assert ours.khat[0] == pytest.approx(float(k_arviz), abs=1e-12)
    # per point, through the public entry point: the draws axis of [S, P] goes last for ArviZ
    result = psis_diagnostic(local_toy.model, local_toy.guide(scale=0.6), local_toy.x)
    smoothed, k_arviz = az.psislw(result.log_weights.T.copy(), reff=1.0)
    np.testing.assert_allclose(result.khat, k_arviz, atol=1e-12)
    np.testing.assert_allclose(result.psis_ess, 1.0 / np.exp(2 * smoothed).sum(-1), rtol=1e-10)
    normalized = np.exp(result.log_weights - logsumexp(result.log_weights, axis=0))
    np.testing.assert_allclose(result.ess, 1.0 / (normalized**2).sum(0), rtol=1e-10)


def test_psis_from_log_weights_rejects_bad_input():
    """Refuse NaN weights, all-zero weights and fewer than two draws."""
    with pytest.raises(ValueError, match="NaN"):
        psis_from_log_weights(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="zero importance weight"):
        psis_from_log_weights(np.full((10, 2), -np.inf))
    with pytest.raises(ValueError, match="S >= 2"):
        psis_from_log_weights(np.zeros((1, 3)))


def test_invalid_counts_raise(regression):
    """Refuse invalid sample counts and chunk sizes."""
    guide = make_exact_guide(regression.x, regression.y)
    with pytest.raises(ValueError, match="num_samples"):
        log_evidence(regression.model, guide, *regression.args, num_samples=1)
    with pytest.raises(ValueError, match="chunk_size"):
        psis_diagnostic(regression.model, guide, *regression.args, chunk_size=0)


# -- importance resampling -----------------------------------------------------------------------


def _moment_errors(draws: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    return (
        float(np.linalg.norm(draws.mean(0) - mean)),
        float(np.linalg.norm(np.cov(draws.T) - cov)),
    )


def test_resampled_draws_closer_to_exact_posterior(regression):
    """Move resampled draws closer to the exact posterior than the guide's."""
    # mean-field optimum shifted by half a marginal sd and widened: a mediocre guide
    guide = _mean_field(regression, scale_factor=1.2, shift_sd=0.5)
    mean, cov = regression.mean.numpy(), regression.cov.numpy()
    raw = torch.stack([guide(*regression.args) for _ in range(2000)]).detach().double().numpy()
    post = importance_resample(
        regression.model, guide, *regression.args, num_samples=2000, num_proposals=8000
    )
    assert post.samples["w"].shape == (2000, 3)  # no spurious singleton dim
    assert post.dims["w"] == ("w_dim_0",)
    assert post.num_draws == 2000 and post.num_proposals == 8000
    assert post.psis.khat.shape == (1,)
    resampled = post.samples["w"].double().numpy()
    raw_mean_error, raw_cov_error = _moment_errors(raw, mean, cov)
    mean_error, cov_error = _moment_errors(resampled, mean, cov)
    # raw errors are the guide's bias; resampled ones shrink to Monte Carlo noise of ~1/sqrt(ESS)
    assert mean_error < 0.25 * raw_mean_error
    assert cov_error < 0.5 * raw_cov_error
    smooth = importance_resample(
        regression.model,
        guide,
        *regression.args,
        num_samples=2000,
        num_proposals=8000,
        smooth=True,
    )
    assert smooth.smoothed
    assert _moment_errors(smooth.samples["w"].double().numpy(), mean, cov)[0] < 0.25 * (
        raw_mean_error
    )


def test_resampling_is_per_point_for_local_latents(local_toy):
    """Resample each data point independently for local latents."""
    exact_mean = local_toy.exact_posterior_mean().numpy()
    guide = local_toy.guide(scale=0.8, shift=0.4)
    post = importance_resample(local_toy.model, guide, local_toy.x, num_samples=1000)
    z = post.samples["z"].double().numpy()
    assert z.shape == (1000, 40, 2) and post.dims["z"] == ("data", "z_dim_0")
    assert post.psis.khat.shape == (40,)
    # the guide is off by 0.4 in every coordinate; resampled means are within MC noise of exact
    error = np.abs(z.mean(0) - exact_mean)
    assert np.mean(error) < 0.1
    # the deterministic site is resampled with its latent, draw by draw and point by point
    np.testing.assert_allclose(
        post.samples["z_norm"].numpy(), np.linalg.norm(z, axis=-1), rtol=1e-5
    )


# -- bounds versus K -----------------------------------------------------------------------------


def test_bound_curve_exact_guide_is_flat(regression):
    """Keep the bound curve flat at log p(x) for the exact guide."""
    guide = make_exact_guide(regression.x, regression.y)
    curve = iw_bound_curve(regression.model, guide, *regression.args, ks=(1, 10, 100))
    assert curve.num_samples == 2000 and list(curve.num_groups) == [2000, 200, 20]
    np.testing.assert_allclose(curve.bound, regression.log_evidence, atol=2e-3)


def test_bound_curve_rises_from_elbo_to_evidence(regression):
    """Rise from the ELBO at K = 1 toward the log-evidence."""
    mean, cov = regression.mean, regression.cov
    q_mean, q_cov = mean + 0.5 * cov.diagonal().sqrt(), 0.5 * cov
    guide = gaussian_guide(q_mean, q_cov)
    # exact ELBO = log p(y) - KL(q || p) for Gaussians
    q = torch.distributions.MultivariateNormal(q_mean, q_cov)
    p = torch.distributions.MultivariateNormal(mean, cov)
    elbo = regression.log_evidence - float(torch.distributions.kl_divergence(q, p))
    curve = iw_bound_curve(
        regression.model, guide, *regression.args, ks=(1, 5, 50), num_samples=5000
    )
    assert abs(curve.bound[0] - elbo) < 3 * curve.se[0]
    assert curve.bound[0] < curve.bound[1] < curve.bound[2] <= regression.log_evidence + 1e-3
    assert abs(curve.log_evidence - regression.log_evidence) < 0.2
