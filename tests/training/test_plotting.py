"""plot_history draws the per-step history with the held-out values."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pytest  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402

from pyro_vi_ext.training import fit, plot_history  # noqa: E402
from tests.training._problems import (  # noqa: E402
    regression_data,
    regression_guide,
    regression_model,
)


class _TermsELBO(Trace_ELBO):
    def loss_and_grads(self, model, guide, *args, **kwargs):
        value = super().loss_and_grads(model, guide, *args, **kwargs)
        self.last_terms = {"elbo": -value}
        return value

    def loss(self, model, guide, *args, **kwargs):
        value = super().loss(model, guide, *args, **kwargs)
        self.last_terms = {"elbo": -value}
        return value


@pytest.fixture(scope="module")
def result():
    """Fit briefly, with terms and evaluation, to have something to plot."""
    pyro.clear_param_store()
    x, y, _, _ = regression_data(n=40)
    return fit(regression_model, regression_guide, (x, y), _TermsELBO(),
               pyro.optim.Adam({"lr": 0.05}), num_epochs=4, batch_size=10, clip_norm=100.0,
               eval_data=(x[:10], y[:10]))  # fmt: skip


def test_default_panels_and_eval_markers(result):
    """Default panels; per-point eval_loss markers on the per-point loss panel."""
    fig = plot_history(result, smooth=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss", "elbo", "grad_norm", "lr"]
    loss_ax = fig.axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["loss (step)", "loss (3-step mean)", "eval_loss"]
    steps, values = loss_ax.get_lines()[2].get_data()
    np.testing.assert_array_equal(steps, result.epoch_history["step"])
    np.testing.assert_array_equal(values, result.epoch_history["eval_loss"])
    raw_x, raw_y = loss_ax.get_lines()[0].get_data()
    np.testing.assert_array_equal(raw_y, result.history["loss"])
    assert list(raw_x) == list(range(1, 17))
    plt.close(fig)


def test_key_selection_log_scale_and_errors(result):
    """Chosen keys, log scale, bare mappings and errors."""
    fig = result.plot(keys=["loss", "eval_elbo"], logy=["loss"], ncols=1)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "eval_elbo"]
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"
    plt.close(fig)
    fig = plot_history(result.history, keys=["lr"])  # a bare step-history mapping works too
    assert fig.axes[0].get_title() == "lr"
    plt.close(fig)
    with pytest.raises(KeyError, match="no history named 'nope'"):
        plot_history(result, keys=["nope"])
    with pytest.raises(TypeError, match="`result`"):
        plot_history([1, 2, 3])
