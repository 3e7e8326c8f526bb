"""PSIS-LOO for VI: exact LOO on the conjugate regression, ArviZ on posterior draws, errors."""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pytest
import torch

from models.linear_regression import FixedGaussianGuide, exact_posterior
from pyro_vi_ext.diagnostics import (
    loo_from_inference_data,
    loo_from_log_weights,
    to_inference_data,
    vi_loo,
)


def _exact_loo(regression) -> np.ndarray:
    """``log N(y_i | x_i' m_-i, 1 + x_i' S_-i x_i)`` with the posterior fitted without point i."""
    x, y = regression.x.double(), regression.y.double()
    values = []
    for i in range(x.shape[0]):
        keep = torch.arange(x.shape[0]) != i
        mean, cov = exact_posterior(x[keep], y[keep])  # noise and prior scale 1, as the fixture
        loc, var = float(x[i] @ mean), float(1.0 + x[i] @ cov @ x[i])
        values.append(-0.5 * (float(y[i]) - loc) ** 2 / var - 0.5 * math.log(2 * math.pi * var))
    return np.array(values)


@pytest.fixture(scope="module")
def shifted_guide(regression):
    """Close to the posterior but not equal: mean 0.7 sd off, covariance 1.5 times too wide."""
    sd = regression.cov.diagonal().sqrt()
    return FixedGaussianGuide(regression.mean + 0.7 * sd, 1.5 * regression.cov)


@pytest.fixture(scope="module")
def shifted_idata(regression, shifted_guide):
    """4000 draws of the shifted guide, exported."""
    pyro.set_rng_seed(0)
    return to_inference_data(regression.model, shifted_guide, *regression.args, num_samples=4000)


def test_vi_loo_matches_exact_loo_while_plain_loo_is_off(regression, shifted_idata):
    """Within Monte Carlo error of the closed form; az.loo on the same draws is not."""
    exact = _exact_loo(regression)
    loo = loo_from_inference_data(shifted_idata)
    error = abs(loo["elpd_loo"] - exact.sum())
    assert 0.0 < loo["mcse_elpd_loo"] < 0.2
    assert error < 4 * loo["mcse_elpd_loo"]
    np.testing.assert_allclose(loo["loo_i"].values, exact, atol=0.15)
    assert loo["pareto_k"].dims == ("data",) and loo["pareto_k"].shape == (50,)
    assert loo["pareto_k"].max() < 0.7 and not loo["warning"]
    assert 2.0 < loo["p_loo"] < 4.5  # three regression weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ flags the raw draws' k-hat
        plain = az.loo(shifted_idata)
    plain_error = abs(plain["elpd_loo"] - exact.sum())
    assert plain_error > 1.0 and plain_error > 10 * loo["mcse_elpd_loo"]
    assert plain_error > 5 * error


def test_vi_loo_runs_the_model_and_agrees_with_the_export(regression, shifted_guide):
    """vi_loo from model and guide; its result prints and goes into az.compare."""
    pyro.set_rng_seed(1)
    loo = vi_loo(regression.model, shifted_guide, *regression.args, num_samples=4000)
    exact = _exact_loo(regression).sum()
    assert abs(loo["elpd_loo"] - exact) < 4 * loo["mcse_elpd_loo"]
    assert loo["n_samples"] == 4000 and loo["n_data_points"] == 50
    assert "elpd_loo" in str(loo)  # ArviZ's table
    comparison = az.compare({"vi": loo, "same": loo.copy()})
    assert list(comparison.columns[:2]) == ["rank", "elpd_loo"]


def test_equal_weights_reduce_to_arviz_loo():
    """Draws from the posterior itself (log weights constant) give az.loo exactly."""
    rng = np.random.default_rng(3)
    log_lik = rng.normal(-1.0, 0.4, size=(1, 2000, 12)) + rng.normal(0, 0.1, size=(1, 1, 12))
    idata = az.from_dict(log_likelihood={"y": log_lik})
    reference = az.loo(idata, pointwise=True, reff=1.0)
    ours = loo_from_log_weights(log_lik[0], np.full(2000, -3.0))
    for key in ("elpd_loo", "se", "p_loo"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(ours["loo_i"], reference["loo_i"].values, rtol=1e-10)
    np.testing.assert_allclose(ours["pareto_k"], reference["pareto_k"].values, rtol=1e-10)


def test_hand_computed_small_case():
    """Three draws of two points, no smoothing possible: plain self-normalized weights."""
    log_lik = np.log(np.array([[0.2, 0.5], [0.4, 0.1], [0.3, 0.3]]))
    log_w = np.log(np.array([1.0, 2.0, 3.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few draws for a Pareto fit
        ours = loo_from_log_weights(log_lik, log_w, as_dict=True, warn=False)
    w = np.array([1.0, 2.0, 3.0])[:, None] / np.exp(log_lik)
    w = w / w.sum(0)
    expected = np.log((w * np.exp(log_lik)).sum(0))
    np.testing.assert_allclose(ours["loo_i"], expected, rtol=1e-12)
    v = np.array([1.0, 2.0, 3.0]) / 6.0
    lppd = np.log(v @ np.exp(log_lik))
    assert ours["p_loo"] == pytest.approx(float((lppd - expected).sum()), rel=1e-12)


def test_local_latents_use_pointwise_weights(local_toy):
    """No global latent: p(x_i | x_-i) = p(x_i) = N(mu, 2 I), known exactly."""
    guide = local_toy.guide(scale=1.3, shift=0.2)
    pyro.set_rng_seed(2)
    idata = to_inference_data(local_toy.model, guide, local_toy.x, num_samples=2000)
    stats = idata.sample_stats
    assert stats["log_weight_pointwise"].dims == ("chain", "draw", "data")
    np.testing.assert_allclose(
        stats["log_weight_pointwise"].sum("data"), stats["log_weight"], rtol=1e-10
    )
    loo = loo_from_inference_data(idata)
    exact = local_toy.exact_log_evidence().numpy()
    assert abs(loo["elpd_loo"] - exact.sum()) < 4 * loo["mcse_elpd_loo"]
    # the leave-one-out posterior of a local latent is its prior, far from the guide for
    # outlying points: those carry the larger Monte Carlo error
    assert np.mean(np.abs(loo["loo_i"].values - exact)) < 0.05
    np.testing.assert_allclose(loo["loo_i"].values, exact, atol=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = az.loo(idata)
    assert abs(plain["elpd_loo"] - exact.sum()) > 10 * loo["mcse_elpd_loo"]


def test_errors_name_the_problem(regression, shifted_guide, local_toy):
    """Resampled exports, foreign objects, unknown sites, subsampling, bad shapes."""
    resampled = to_inference_data(
        regression.model, shifted_guide, *regression.args, num_samples=100, resample=True
    )
    with pytest.raises(ValueError, match="resample=False"):
        loo_from_inference_data(resampled)
    with pytest.raises(ValueError, match="az.loo"):
        loo_from_inference_data(az.from_dict(posterior={"a": np.zeros((1, 10))}))
    idata = to_inference_data(regression.model, shifted_guide, *regression.args, num_samples=50)
    with pytest.raises(ValueError, match="no observed site 'z'"):
        loo_from_inference_data(idata, "z")
    with pytest.raises(ValueError, match="subsamples 10 of 40"):
        vi_loo(local_toy.model, local_toy.guide(), local_toy.x, 10, num_samples=50)
    with pytest.raises(ValueError, match=r"\[S\] or \[S, N\]"):
        loo_from_log_weights(np.zeros((10, 3)), np.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        loo_from_log_weights(np.full((10, 3), np.nan), np.zeros(10))


def test_high_khat_warns(regression):
    """A much too narrow guide: k-hat above the threshold, with a warning.

    k-hat is noisy: at 0.2 x the posterior covariance and 1,000 draws it ranged 0.37-0.89 over
    seeds, so the guide is narrower (0.02 x: 0.95-1.19 over seeds 0-5 with 4,000 draws).
    """
    narrow = FixedGaussianGuide(regression.mean, 0.02 * regression.cov)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="k-hat above"):
        loo = vi_loo(regression.model, narrow, *regression.args, num_samples=4000)
    assert loo["warning"] and loo["guide_pareto_k"] > 0.7


def test_monte_carlo_error_matches_the_spread_over_seeds(regression, shifted_guide):
    """Over 12 seeds the errors scatter as mcse_elpd_loo says and centre on the exact value."""
    exact = _exact_loo(regression).sum()
    errors, mcses = [], []
    for seed in range(12):
        pyro.set_rng_seed(100 + seed)
        loo = vi_loo(regression.model, shifted_guide, *regression.args, num_samples=2000)
        errors.append(loo["elpd_loo"] - exact)
        mcses.append(loo["mcse_elpd_loo"])
    spread, mcse = float(np.std(errors, ddof=1)), float(np.mean(mcses))
    # the sample sd of 12 values is within about +-45% of the truth (two standard errors)
    assert 0.55 * mcse < spread < 1.8 * mcse
    assert abs(np.mean(errors)) < 3 * spread / math.sqrt(12)
