"""The ArviZ export: groups, dims, values checked by hand, ArviZ functions, netCDF, plots."""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from models.eight_schools import build_eight_schools, eight_schools_data
from models.linear_regression import make_exact_guide
from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.diagnostics import (
    iw_bound_curve,
    log_evidence,
    plot_bound_vs_k,
    plot_khat,
    psis_diagnostic,
    psis_from_log_weights,
    to_inference_data,
)

SAMPLE_GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "sample_stats"}


def _normal_log_prob(value, loc, scale):
    return -0.5 * ((value - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


@pytest.fixture(scope="module")
def regression_idata(regression):
    """1000 draws of the exact posterior in 2 pseudo-chains, with the loss recorded."""
    pyro.set_rng_seed(0)
    guide = make_exact_guide(regression.x, regression.y)
    loss = ImportanceWeightedELBO(num_particles=8, estimator="dreg")
    return to_inference_data(
        regression.model, guide, *regression.args, num_samples=1000, num_chains=2, loss=loss
    )


def test_regression_groups_dims_and_coords(regression_idata, regression):
    """Groups, dims named after plates, no singleton dims, plate coordinates."""
    idata = regression_idata
    assert SAMPLE_GROUPS | {"observed_data"} <= set(idata.groups())
    w = idata.posterior["w"]
    assert w.dims == ("chain", "draw", "w_dim_0") and w.shape == (2, 500, 3)  # no singleton
    for group in ("log_likelihood", "posterior_predictive"):
        assert idata[group]["y"].dims == ("chain", "draw", "data")
        assert idata[group]["y"].shape == (2, 500, 50)
    assert idata.observed_data["y"].dims == ("data",)
    np.testing.assert_array_equal(idata.observed_data["y"].values, regression.y.numpy())
    np.testing.assert_array_equal(idata.log_likelihood["data"].values, np.arange(50))
    for stat in ("lp", "log_q", "log_weight"):
        assert idata.sample_stats[stat].dims == ("chain", "draw")


def test_regression_values_match_hand_computation(regression_idata, regression):
    """Log-likelihood, lp and log q equal the closed forms on the exported draws."""
    idata = regression_idata
    w = idata.posterior["w"].values.astype(np.float64)  # [2, 500, 3]
    x, y = regression.x.double().numpy(), regression.y.double().numpy()
    mean = np.einsum("cdk,nk->cdn", w, x)
    log_lik = _normal_log_prob(y, mean, 1.0)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, log_lik, atol=1e-4)
    assert idata.log_likelihood["y"].dtype == np.float64
    log_prior = _normal_log_prob(w, 0.0, 1.0).sum(-1)
    stats = idata.sample_stats
    np.testing.assert_allclose(stats["lp"].values, log_prior + log_lik.sum(-1), atol=2e-3)
    q = torch.distributions.MultivariateNormal(regression.mean, regression.cov)
    log_q = q.log_prob(torch.as_tensor(w)).numpy()
    np.testing.assert_allclose(stats["log_q"].values, log_q, atol=2e-3)
    np.testing.assert_allclose(stats["log_weight"], stats["lp"] - stats["log_q"], atol=1e-9)
    # exact guide: every log weight is log p(y)
    np.testing.assert_allclose(stats["log_weight"].values, regression.log_evidence, atol=3e-3)


def test_posterior_predictive_is_paired_with_the_draws(regression_idata, regression):
    """Predictive minus the draw's mean is unit noise."""
    idata = regression_idata
    w = idata.posterior["w"].values.astype(np.float64)
    mean = np.einsum("cdk,nk->cdn", w, regression.x.double().numpy())
    residual = (idata.posterior_predictive["y"].values - mean).ravel()  # noise, sd 1
    count = residual.size
    assert abs(residual.mean()) < 3 / math.sqrt(count)
    assert abs(residual.std() - 1.0) < 3 / math.sqrt(2 * count)


def test_regression_attrs(regression_idata):
    """Loss, estimator and library attributes."""
    for attrs in (regression_idata.attrs, regression_idata.posterior.attrs):
        assert attrs["loss"] == "ImportanceWeightedELBO"
        assert attrs["estimator"] == "dreg"
        assert attrs["loss_num_particles"] == 8
        assert attrs["inference_library"] == "pyro"
        assert attrs["draws"] == "guide"
        assert attrs["num_chains"] == 2


def test_arviz_summary_and_plots(regression_idata):
    """ArviZ summary and plots run on the export."""
    summary = az.summary(regression_idata)
    assert summary.index.tolist() == ["w[0]", "w[1]", "w[2]"]
    assert np.all(np.abs(summary["r_hat"] - 1.0) < 0.05)  # pseudo-chains of iid draws
    assert np.all(summary["ess_bulk"] > 500)
    axes = az.plot_posterior(regression_idata, var_names=["w"])
    assert np.asarray(axes).size == 3
    ax = az.plot_ppc(regression_idata, num_pp_samples=50, random_seed=0)
    assert len(np.atleast_1d(ax)[0].get_lines()) > 50


def test_loo_is_finite_with_sensible_parameter_count(regression_idata):
    """az.loo on exact-posterior draws: finite, p_loo near 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Pareto k too high" warning
        loo = az.loo(regression_idata)
    assert np.isfinite(loo["elpd_loo"]) and np.isfinite(loo["se"])
    assert 1.5 < loo["p_loo"] < 6.0  # three regression weights
    assert loo["pareto_k"].max() < 0.7


def test_netcdf_round_trip(regression_idata, tmp_path):
    """A netCDF round trip keeps groups, dims, values and attributes."""
    path = tmp_path / "fit.nc"
    regression_idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert set(loaded.groups()) == set(regression_idata.groups())
    for group in regression_idata.groups():
        original, reloaded = regression_idata[group], loaded[group]
        assert set(original.data_vars) == set(reloaded.data_vars)
        for name in original.data_vars:
            assert reloaded[name].dims == original[name].dims
            np.testing.assert_array_equal(reloaded[name].values, original[name].values)
    assert loaded.posterior.attrs["estimator"] == "dreg"
    assert loaded.attrs["loss"] == "ImportanceWeightedELBO"
    assert np.isfinite(az.loo(loaded)["elpd_loo"])


def test_num_chains_must_divide_num_samples(regression):
    """Pseudo-chains must split the draws evenly."""
    guide = make_exact_guide(regression.x, regression.y)
    with pytest.raises(ValueError, match="multiple of num_chains"):
        to_inference_data(regression.model, guide, *regression.args, num_samples=100, num_chains=3)


def test_resampled_regression_export(regression):
    """Resampled draws correct a shifted guide and stay paired with their rows."""
    q_mean = regression.mean + 0.5 * regression.cov.diagonal().sqrt()
    guide = _gaussian_guide(q_mean, 1.5 * regression.cov)
    idata = to_inference_data(
        regression.model, guide, *regression.args, num_samples=1000, resample=True
    )
    assert idata.posterior.attrs["draws"] == "importance_resampled"
    assert idata.posterior.attrs["num_proposals"] == 4000
    w = idata.posterior["w"].values.reshape(-1, 3).astype(np.float64)
    mean, sd = regression.mean.numpy(), regression.cov.diagonal().sqrt().numpy()
    assert np.all(np.abs(w.mean(0) - mean) < 0.15 * sd)  # the guide is off by 0.5 sd
    # rows stay paired: the log-likelihood and weights are those of the exported draws
    log_lik = _normal_log_prob(
        regression.y.double().numpy(), w @ regression.x.double().numpy().T, 1.0
    )
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], log_lik, atol=1e-4)
    log_q = torch.distributions.MultivariateNormal(q_mean, 1.5 * regression.cov)
    np.testing.assert_allclose(
        idata.sample_stats["log_q"].values[0],
        log_q.log_prob(torch.as_tensor(w)).numpy(),
        atol=2e-3,
    )


def _gaussian_guide(mean, cov):
    from tests.diagnostics._toys import gaussian_guide

    return gaussian_guide(mean, cov)


# -- local latents -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto:UserWarning")
def test_local_latent_export(local_toy):
    """Local latents: dims, deterministic sites and the per-point log-likelihood."""
    idata = to_inference_data(
        local_toy.model, local_toy.guide(scale=1.2), local_toy.x, num_samples=400
    )
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "data", "z_dim_0") and z.shape == (1, 400, 40, 2)
    assert idata.posterior["z_norm"].dims == ("chain", "draw", "data")
    np.testing.assert_allclose(
        idata.posterior["z_norm"].values, np.linalg.norm(z.values, axis=-1), rtol=1e-5
    )
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")  # event dim summed
    assert idata.observed_data["x"].dims == ("data", "x_dim_0")
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "data", "x_dim_0")
    x = local_toy.x.double().numpy()
    log_lik = _normal_log_prob(x, z.values.astype(np.float64), 1.0).sum(-1)
    np.testing.assert_allclose(idata.log_likelihood["x"].values, log_lik, atol=1e-4)
    assert np.isfinite(az.loo(idata, pointwise=True)["elpd_loo"])


def test_resampled_local_export_keeps_points_paired(local_toy):
    """Per-point resampling moves latents, log-likelihood and weights together."""
    # every point resamples its own draw; latents, log-likelihood and weights must move together
    guide = local_toy.guide(scale=0.8, shift=0.4)
    idata = to_inference_data(local_toy.model, guide, local_toy.x, num_samples=500, resample=True)
    z = idata.posterior["z"].values[0].astype(np.float64)  # [500, 40, 2]
    x, mu = local_toy.x.double().numpy(), local_toy.mu.double().numpy()
    log_lik = _normal_log_prob(x, z, 1.0).sum(-1)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], log_lik, atol=1e-4)
    lp = (_normal_log_prob(z, mu, 1.0).sum(-1) + log_lik).sum(-1)
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0], lp, atol=5e-3)
    loc = (x + mu) / 2 + 0.4
    log_q = _normal_log_prob(z, loc, 0.8 * math.sqrt(0.5)).sum((-1, -2))
    np.testing.assert_allclose(idata.sample_stats["log_q"].values[0], log_q, atol=5e-3)
    exact = local_toy.exact_posterior_mean().numpy()
    assert np.mean(np.abs(z.mean(0) - exact)) < 0.1  # the raw guide is off by 0.4


def test_subsampled_plate_exports_its_minibatch(local_toy):
    """One frozen minibatch for the whole export."""
    idata = to_inference_data(
        local_toy.model, local_toy.guide(), local_toy.x, 10, num_samples=200, chunk_size=50
    )
    index = idata.posterior["data"].values
    assert index.shape == (10,) and len(set(index.tolist())) == 10
    np.testing.assert_array_equal(idata.observed_data["x"].values, local_toy.x.numpy()[index])
    z = idata.posterior["z"].values.astype(np.float64)
    log_lik = _normal_log_prob(local_toy.x.double().numpy()[index], z, 1.0).sum(-1)
    np.testing.assert_allclose(idata.log_likelihood["x"].values, log_lik, atol=1e-4)
    # exact guide: the weights of every block are those of the same 10 points
    exact = local_toy.exact_log_evidence().numpy()[index]
    per_draw = idata.sample_stats["log_weight"].values
    np.testing.assert_allclose(per_draw, exact.sum(), atol=2e-3)


# -- other models --------------------------------------------------------------------------------


def test_eight_schools_autoguide_export():
    """An AutoNormal guide with a deterministic site."""
    sigma, y = eight_schools_data()
    model, guide = build_eight_schools(parameterization="noncentered")
    idata = to_inference_data(model, guide, sigma, y, num_samples=200, num_chains=2)
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw") and post["tau"].dims == ("chain", "draw")
    assert post["theta_tilde"].dims == ("chain", "draw", "school")
    assert post["theta"].dims == ("chain", "draw", "school")  # pyro.deterministic
    np.testing.assert_allclose(
        post["theta"].values,
        post["mu"].values[..., None] + post["tau"].values[..., None] * post["theta_tilde"].values,
        rtol=1e-5,
        atol=1e-5,
    )
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "school")
    assert set(az.summary(idata, var_names=["mu", "tau"]).index) == {"mu", "tau"}


def test_site_specific_scale_warns(local_toy):
    """Site-specific scales warn; a shared scale does not."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=0.5):  # a KL-annealing factor on the latent only
                z = pyro.sample("z", dist.Normal(local_toy.mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    with pytest.warns(UserWarning, match="tempered"):
        log_evidence(model, local_toy.guide(), local_toy.x, num_samples=10)
    # a scale shared by every site is not tempering: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        log_evidence(
            poutine.scale(local_toy.model, scale=0.5),
            poutine.scale(local_toy.guide(), scale=0.5),
            local_toy.x,
            num_samples=10,
        )


# -- plots ---------------------------------------------------------------------------------------


def test_plot_khat(local_toy):
    """k-hat plot, scatter and histogram."""
    result = psis_diagnostic(
        local_toy.model, local_toy.guide(scale=0.6), local_toy.x, num_samples=1000
    )
    ax = plot_khat(result)
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == 40
    assert "S = 1000" in ax.get_title()
    ax = result.plot(kind="hist")
    assert ax.get_xlabel().endswith(r"$\hat k$") and len(ax.patches) > 0
    with pytest.raises(ValueError, match="kind"):
        plot_khat(result, kind="bars")


def test_plot_bound_vs_k(regression):
    """Bound versus K on a log axis."""
    guide = _gaussian_guide(regression.mean, 0.5 * regression.cov)
    ax = plot_bound_vs_k(regression.model, guide, *regression.args, ks=(1, 4, 16))
    assert ax.get_xscale() == "log"
    x_values = ax.lines[0].get_xdata()
    np.testing.assert_array_equal(x_values, [1, 4, 16])
    curve = iw_bound_curve(regression.model, guide, *regression.args, ks=(1, 4, 16))
    assert curve.plot() is not None


# -- what the draws are: attributes, r_hat, PSIS ------------------------------------------------


def test_vi_exports_say_their_draws_are_independent(regression_idata):
    """Every export says its draws are independent and how to read r_hat."""
    from pyro_vi_ext.diagnostics.arviz_export import READING_R_HAT

    for attrs in (regression_idata.attrs, regression_idata.posterior.attrs):
        assert attrs["creation_library"] == "pyro_vi_ext"
        assert attrs["sampler"] == "variational guide"
        assert attrs["draws_are_independent"] == 1
        assert attrs["r_hat_note"] == READING_R_HAT and "kind='stats'" in READING_R_HAT
    stats = az.summary(regression_idata, kind="stats")
    assert "r_hat" not in stats.columns and list(stats.index) == ["w[0]", "w[1]", "w[2]"]


def test_psis_attributes_match_the_exported_weights(regression):
    """psis_khat and psis_ess are those of the exported log weights."""
    guide = _gaussian_guide(regression.mean, 0.5 * regression.cov)
    pyro.set_rng_seed(0)
    idata = to_inference_data(regression.model, guide, *regression.args, num_samples=2000)
    expected = psis_from_log_weights(idata.sample_stats["log_weight"].values.reshape(-1))
    assert idata.posterior.attrs["psis_khat"] == pytest.approx(float(expected.khat[0]))
    assert idata.posterior.attrs["psis_ess"] == pytest.approx(float(expected.psis_ess[0]))
    assert idata.posterior.attrs["psis_ess"] < 0.8 * 2000  # far fewer than the raw count


def test_resampled_export_carries_the_proposals_psis_ess(regression):
    """Resampled exports record the proposals' PSIS ESS; the draws repeat."""
    guide = _gaussian_guide(regression.mean, 1.5 * regression.cov)
    pyro.set_rng_seed(0)
    idata = to_inference_data(
        regression.model, guide, *regression.args, num_samples=500, resample=True
    )
    attrs = idata.posterior.attrs
    assert attrs["sampler"] == "importance resampling of variational guide draws"
    assert attrs["num_proposals"] == 2000
    assert 0 < attrs["psis_ess"] < 2000 and attrs["psis_khat"] < 0.7
    # repeated draws: fewer distinct values than draws, which ArviZ's ess does not see
    distinct = len(np.unique(idata.posterior["w"].values[0, :, 0]))
    assert distinct < 500


# -- coords and dims ----------------------------------------------------------------------------


def test_user_dims_and_coords_apply_to_every_group(regression):
    """dims= and coords= reach every group; a renamed plate keeps its indices."""
    guide = make_exact_guide(regression.x, regression.y)
    idata = to_inference_data(
        regression.model,
        guide,
        *regression.args,
        num_samples=20,
        dims={"w": ["feature"], "y": ["obs"]},
        coords={"feature": ["a", "b", "c"]},
    )
    assert idata.posterior["w"].dims == ("chain", "draw", "feature")
    assert idata.posterior["feature"].values.tolist() == ["a", "b", "c"]
    for group in ("log_likelihood", "posterior_predictive"):
        assert idata[group]["y"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["y"].dims == ("obs",)
    # the renamed plate keeps its data indices as coordinates
    np.testing.assert_array_equal(idata.observed_data["obs"].values, np.arange(50))
    idata = to_inference_data(
        regression.model,
        guide,
        *regression.args,
        num_samples=20,
        coords={"data": np.arange(100, 150)},
    )
    for group in ("log_likelihood", "posterior_predictive", "observed_data"):
        np.testing.assert_array_equal(idata[group]["data"].values, np.arange(100, 150))


def test_local_dims_rename_the_pointwise_weights_too(local_toy):
    """Renaming a plate dim renames it in log_weight_pointwise too."""
    idata = to_inference_data(
        local_toy.model,
        local_toy.guide(),
        local_toy.x,
        num_samples=20,
        dims={"z": ["point", "coordinate"], "x": ["point", "coordinate"]},
    )
    assert idata.posterior["z"].dims == ("chain", "draw", "point", "coordinate")
    assert idata.sample_stats["log_weight_pointwise"].dims == ("chain", "draw", "point")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "point")


def test_bad_dims_and_coords_are_named(regression):
    """Unknown variables, wrong lengths and unknown dims raise naming them."""
    guide = make_exact_guide(regression.x, regression.y)
    args = (regression.model, guide, *regression.args)
    with pytest.raises(ValueError, match="variable 'v'.*exported variables"):
        to_inference_data(*args, num_samples=10, dims={"v": ["a"]})
    with pytest.raises(ValueError, match=r"dims\['w'\] gives 2 names"):
        to_inference_data(*args, num_samples=10, dims={"w": ["a", "b"]})
    with pytest.raises(ValueError, match="coords names dim 'school'"):
        to_inference_data(*args, num_samples=10, coords={"school": range(8)})
    with pytest.raises(ValueError, match=r"coords\['data'\] has 3 values but dim 'data' has size"):
        to_inference_data(*args, num_samples=10, coords={"data": [1, 2, 3]})
