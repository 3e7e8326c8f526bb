"""The ArviZ adapter on numpy inputs, under whichever ArviZ is installed.

This module imports neither torch nor pyro (it loads ``_arviz_compat.py`` by path, bypassing the
package ``__init__``), so it also runs on Python >= 3.12 with ArviZ 1.x, where torch is not
installed::

    python3.12 -m venv /tmp/venv312
    /tmp/venv312/bin/pip install "arviz>=1" h5netcdf h5py pytest
    /tmp/venv312/bin/python -m pytest --noconftest -p no:cacheprovider \
        tests/diagnostics/test_arviz_compat.py

Under the project's Python 3.11 (ArviZ 0.23) the 1.x-only tests are skipped, and vice versa.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "pyro_vi_ext" / "diagnostics" / "_arviz_compat.py"
_SPEC = importlib.util.spec_from_file_location("_arviz_compat_standalone", _PATH)
compat = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compat)

arviz_1x = pytest.mark.skipif(compat.ARVIZ_MAJOR < 1, reason="needs ArviZ >= 1 (Python >= 3.12)")
arviz_023 = pytest.mark.skipif(compat.ARVIZ_MAJOR >= 1, reason="ArviZ 0.23 only")


def test_psislw_recovers_a_known_pareto_shape():
    """Recover the Pareto shape of weights drawn with a known tail."""
    # w = U^(-k) has a Pareto tail of shape k; a sign error in the adapter would fit the bounded
    # lower tail instead and give a negative k
    rng = np.random.default_rng(0)
    shapes = np.array([0.2, 0.8])
    log_weights = -shapes[:, None] * np.log(rng.uniform(size=(2, 20_000)))
    smoothed, khat = compat.psislw(log_weights)
    assert khat.shape == (2,) and smoothed.shape == (2, 20_000)
    np.testing.assert_allclose(khat, shapes, atol=0.1)
    np.testing.assert_allclose(np.exp(smoothed).sum(-1), 1.0, rtol=1e-9)
    order = np.argsort(log_weights, axis=-1)
    assert np.all(np.diff(np.take_along_axis(smoothed, order, -1), axis=-1) >= -1e-9)


def test_psislw_rejects_a_single_draw():
    """Refuse PSIS on a single draw."""
    with pytest.raises(ValueError, match="at least 2 draws"):
        compat.psislw(np.zeros((3, 1)))


def test_from_dict_groups_dims_coords_attrs():
    """Build the groups, dims, coords and attributes through the adapter."""
    rng = np.random.default_rng(1)
    data = compat.from_dict(
        {
            "posterior": {"w": rng.normal(size=(2, 50, 3))},
            "log_likelihood": {"y": rng.normal(size=(2, 50, 4))},
            "posterior_predictive": {"y": rng.normal(size=(2, 50, 4, 2))},
            "observed_data": {"y": rng.normal(size=(4, 2))},
            "sample_stats": {"lp": rng.normal(size=(2, 50))},
            "prior": {},  # empty groups are left out
        },
        coords={"data": [10, 11, 12, 13]},
        dims={"y": ["data", "y_dim_0"]},
        attrs={"loss": "ImportanceWeightedELBO"},
        group_attrs={"posterior": {"estimator": "dreg"}, "prior": {"ignored": 1}},
    )
    assert data["posterior"]["w"].dims == ("chain", "draw", "w_dim_0")
    # log_likelihood drops the event dim that only the observation has
    assert data["log_likelihood"]["y"].dims == ("chain", "draw", "data")
    assert data["posterior_predictive"]["y"].dims == ("chain", "draw", "data", "y_dim_0")
    assert data["observed_data"]["y"].dims == ("data", "y_dim_0")
    np.testing.assert_array_equal(data["log_likelihood"]["data"].values, [10, 11, 12, 13])
    assert data.attrs["loss"] == "ImportanceWeightedELBO"
    assert data["posterior"].attrs["estimator"] == "dreg"
    assert "prior" not in set(_group_names(data))


def _group_names(data):
    if compat.ARVIZ_MAJOR >= 1:
        return list(data.children)
    return data.groups()


@arviz_1x
def test_arviz_1x_datatree_loo_and_netcdf(tmp_path):
    """Round-trip a DataTree through loo and netCDF under ArviZ 1.x."""
    import xarray as xr
    from arviz_stats import loo

    rng = np.random.default_rng(2)
    y = rng.normal(size=8)
    # the conjugate posterior of a unit-variance mean with a N(0, 1) prior
    mean = y.sum() / 9 + rng.normal(size=(1, 400, 1)) / 3
    log_lik = -0.5 * (y - mean) ** 2 - 0.5 * np.log(2 * np.pi)
    tree = compat.from_dict(
        {
            "posterior": {"m": mean[..., 0]},
            "log_likelihood": {"y": log_lik},
            "observed_data": {"y": y},
        },
        dims={"y": ["data"]},
        attrs={"loss": "Trace_ELBO"},
    )
    assert isinstance(tree, xr.DataTree)
    result = loo(tree)
    assert np.isfinite(result.elpd) and 0.3 < result.p < 3.0  # one parameter
    path = tmp_path / "tree.nc"
    tree.to_netcdf(path)
    loaded = xr.open_datatree(path)
    np.testing.assert_array_equal(loaded["posterior"]["m"].values, mean[..., 0])
    assert loaded.attrs["loss"] == "Trace_ELBO"


@arviz_023
def test_arviz_023_returns_inference_data():
    """Return an InferenceData under ArviZ 0.23."""
    import arviz as az

    data = compat.from_dict({"posterior": {"m": np.zeros((1, 10))}})
    assert isinstance(data, az.InferenceData)
