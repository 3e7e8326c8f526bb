"""fit(data_plate=...): models and guides that take only their data train on minibatches.

The unmodified models size their plate by their argument (``pyro.plate("data", len(x))`` or
``x.shape[0]``), as Pyro's tutorials do; ``fit`` must give that plate the scale N/B and the full
size N, so that every loss sees N.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch.distributions import constraints

from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.training import fit
from pyro_vi_ext.training._data_plate import DataPlateScaling
from tests.training._problems import (
    SIGMA,
    TAU,
    LocalLatentModel,
    delta_guide,
    regression_data,
    regression_guide,
    regression_model,
)


def plain_model_len(x, y=None):
    """Write the conjugate regression as a Pyro tutorial does: the plate sized by ``len(x)``."""
    w = pyro.sample("w", dist.Normal(0.0, TAU).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal((x * w).sum(-1), SIGMA), obs=y)


def plain_model_shape(x, y=None):
    """Write it with ``pyro.plate("data", x.shape[0])``."""
    w = pyro.sample("w", dist.Normal(0.0, TAU).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), SIGMA), obs=y)


def plain_guide(x, y=None):
    """Full-rank Gaussian guide taking only the data."""
    d = x.shape[-1]
    loc = pyro.param("loc", torch.zeros(d))
    scale_tril = pyro.param("scale_tril", 0.1 * torch.eye(d), constraint=constraints.lower_cholesky)
    pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def test_scaling_matches_a_subsampled_plate_site_by_site():
    """Scale and frame of every site equal those of pyro.plate(size=N, subsample=idx)."""
    x, y, _, _ = regression_data(n=30)
    idx = torch.tensor([3, 7, 11, 20, 29])
    pyro.set_rng_seed(0)
    with DataPlateScaling("data", full_size=30, batch_size=5):
        plain = pyro.poutine.trace(plain_model_len).get_trace(x[idx], y[idx])
    pyro.set_rng_seed(0)
    convention = pyro.poutine.trace(regression_model).get_trace(x[idx], y[idx], idx=idx, n_data=30)
    for name in ("w", "y"):
        assert plain.nodes[name]["scale"] == convention.nodes[name]["scale"], name
        frames = [(f.name, f.size, f.full_size) for f in plain.nodes[name]["cond_indep_stack"]]
        expected = [
            (f.name, f.size, f.full_size) for f in convention.nodes[name]["cond_indep_stack"]
        ]
        assert frames == expected, name
    assert plain.nodes["y"]["scale"] == 6.0
    assert plain.log_prob_sum() == convention.log_prob_sum()


@pytest.mark.parametrize("plain_model", [plain_model_len, plain_model_shape], ids=["len", "shape"])
def test_unmodified_model_runs_exactly_as_the_convention(plain_model):
    """Same seed: bit-identical losses and parameters to the idx/n_data model."""
    x, y, _, _ = regression_data(n=40)
    common = dict(num_epochs=3, batch_size=8, seed=2, progress=False)
    ref = fit(regression_model, regression_guide, (x, y), Trace_ELBO(),
              pyro.optim.Adam({"lr": 0.05}), **common)  # fmt: skip
    pyro.clear_param_store()
    plain = fit(plain_model, plain_guide, (x, y), Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}),
                data_plate="data", **common)  # fmt: skip
    np.testing.assert_array_equal(plain.history["loss_total"], ref.history["loss_total"])
    for name in ref.params:
        assert torch.equal(plain.params[name], ref.params[name]), name


def test_unmodified_conjugate_regression_reaches_the_exact_posterior():
    """Minibatches of N/5 through data_plate: exact posterior (wrong N/B makes variances 5x off).

    Same schedule and tolerances as the idx/n_data test in test_fit.py (optimizer noise of the
    final iterate: about 0.05 posterior sd for the mean, 7% for the variances; 5 such sds).
    """
    x, y, mean, cov = regression_data(n=250)
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05, "betas": (0.9, 0.99)},
         "gamma": 0.97}
    )  # fmt: skip
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    result = fit(plain_model_len, plain_guide, (x, y), loss, optim, num_epochs=100, batch_size=50,
                 seed=0, data_plate="data", progress=False)  # fmt: skip
    q_cov = result.params["scale_tril"] @ result.params["scale_tril"].T
    sd = cov.diag().sqrt()
    assert torch.all(((result.params["loc"] - mean) / sd).abs() < 0.25)
    assert torch.all((q_cov.diag() / cov.diag() - 1).abs() < 0.35), q_cov.diag() / cov.diag()


class _PlainLocalLatentModel(LocalLatentModel):
    """LocalLatentModel written without idx/n_data."""

    def plain_model(self, x):
        w = pyro.param("W", 0.1 * torch.ones(self.latent, self.dim))
        b = pyro.param("b", torch.zeros(self.dim))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w + b, 0.3).to_event(1), obs=x)

    def plain_guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x)):
            loc, s = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))


def test_importance_weighted_loss_sees_the_full_size():
    """ImportanceWeightedELBO reads N from the plate frames: identical run to the convention."""
    lm = _PlainLocalLatentModel()
    x, x_test = lm.data(n=48), lm.data(n=16, seed=4)
    init = {k: v.clone() for k, v in lm.encoder.state_dict().items()}
    runs = []
    for model, guide, plate in (
        (lm.model, lm.guide, None),
        (lm.plain_model, lm.plain_guide, "data"),
    ):
        pyro.clear_param_store()
        lm.encoder.load_state_dict(init)
        loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
        runs.append(fit(model, guide, x, loss, pyro.optim.Adam({"lr": 0.02}), num_epochs=2,
                        batch_size=12, seed=1, data_plate=plate, eval_data=x_test,
                        eval_batch_size=8, progress=False))  # fmt: skip
    convention, plain = runs
    for key in convention.history:
        np.testing.assert_array_equal(plain.history[key], convention.history[key], key)
    np.testing.assert_array_equal(
        plain.epoch_history["eval_loss"], convention.epoch_history["eval_loss"]
    )


def test_importance_weighted_loss_refuses_a_global_latent_as_with_the_convention():
    """The IW bound has no minibatch estimate with a global latent: the same clear refusal."""
    x, y, _, _ = regression_data(n=40)
    loss = ImportanceWeightedELBO(num_particles=4)
    with pytest.raises(ValueError, match="Plate 'data' is subsampled") as convention:
        fit(regression_model, regression_guide, (x, y), loss, pyro.optim.Adam({"lr": 0.05}),
            num_steps=2, batch_size=8, progress=False)  # fmt: skip
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="Plate 'data' is subsampled") as plain:
        fit(plain_model_len, plain_guide, (x, y), loss, pyro.optim.Adam({"lr": 0.05}),
            num_steps=2, batch_size=8, data_plate="data", progress=False)  # fmt: skip
    assert str(plain.value) == str(convention.value)


def test_evaluation_under_data_plate_is_exact():
    """With a point-mass guide the held-out loss is exact under data_plate."""
    x, y, _, _ = regression_data(n=40)
    x_test, y_test, _, _ = regression_data(n=25, seed=9)

    def plain_delta_guide(x, y=None):
        delta_guide(x, y)

    result = fit(plain_model_len, plain_delta_guide, (x, y), Trace_ELBO(),
                 pyro.optim.Adam({"lr": 0.05}), num_epochs=2, batch_size=10,
                 eval_data=(x_test, y_test), eval_batch_size=7, data_plate="data",
                 progress=False)  # fmt: skip
    w = result.params["loc"]
    exact = -(
        dist.Normal((x_test * w).sum(-1), 1.0).log_prob(y_test).sum()
        + dist.Normal(0.0, 1.0).log_prob(w).sum()
    )
    assert result.epoch_history["eval_loss_total"][-1] == pytest.approx(float(exact), rel=1e-5)
    assert result.epoch_history["eval_loss"][-1] == pytest.approx(float(exact) / 25, rel=1e-5)


def _fixed_size_model(x, y=None):
    """Use a plate of a hard-coded size (Pyro itself catches a mismatching observed site)."""
    with pyro.plate("data", 40):
        pyro.sample("noise", dist.Normal(0.0, 1.0))


def _self_subsampling_model(x, y=None):
    """Subsample the data plate inside the model (subsample_size)."""
    with pyro.plate("data", len(x), subsample_size=4):
        pyro.sample("noise", dist.Normal(0.0, 1.0))


def _fixed_size_guide(x, y=None):
    with pyro.plate("data", 40):
        pyro.sample("noise", dist.Normal(pyro.param("noise_loc", torch.zeros(())), 1.0))


@pytest.mark.parametrize(
    "model, plate, fragment",
    [
        (
            plain_model_len,
            "rows",
            r"no sample site in a plate named 'rows' \(plates seen: \['data'\]\)",
        ),
        (_fixed_size_model, "data", r"plate 'data' of size 40, but the minibatch has 8 rows"),
        (_self_subsampling_model, "data", "already subsamples"),
    ],
    ids=["misspelt-plate", "plate-not-sized-by-the-data", "plate-subsampled-by-the-model"],
)
def test_data_plate_mistakes_name_the_plate(model, plate, fragment):
    """A misspelt, hard-coded or self-subsampled plate: an error naming it."""
    x, y, _, _ = regression_data(n=40)
    guide = {plain_model_len: plain_guide, _fixed_size_model: _fixed_size_guide}.get(
        model, lambda x, y=None: pyro.param("unused", torch.zeros(()))
    )
    with pytest.raises(ValueError, match=fragment):
        fit(model, guide, (x, y), Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}), num_steps=2,
            batch_size=8, data_plate=plate, progress=False)  # fmt: skip


def test_autoguide_over_per_row_latents_is_refused_under_minibatches():
    """An autoguide sized by the first minibatch would share B rows of parameters among N rows."""
    from pyro.infer.autoguide import AutoNormal

    y = torch.randn(50) * 3

    def model(y):
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(0.0, 3.0))
            pyro.sample("obs", dist.Normal(z, 0.1), obs=y)

    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"AutoNormal: the latent site\(s\) 'z' have one value"):
        fit(
            model,
            AutoNormal(model),
            (y,),
            Trace_ELBO(),
            pyro.optim.Adam({"lr": 0.05}),
            data_plate="data",
            batch_size=10,
            num_steps=3,
            progress=False,
        )
    # full-batch training sizes the parameters for every row: fine
    pyro.clear_param_store()
    result = fit(
        model,
        AutoNormal(model),
        (y,),
        Trace_ELBO(),
        pyro.optim.Adam({"lr": 0.05}),
        data_plate="data",
        num_steps=3,
        progress=False,
    )
    assert result.params["AutoNormal.locs.z"].shape == (50,)
