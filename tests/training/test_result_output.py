"""fit output that reads right: per-point losses, totals by name, a short repr, tqdm.auto."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import tqdm.auto  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402

import pyro_vi_ext.training._loop as loop_module  # noqa: E402
from pyro_vi_ext.training import fit  # noqa: E402
from tests.training._problems import (  # noqa: E402
    regression_data,
    regression_guide,
    regression_model,
)


def _run():
    pyro.clear_param_store()
    x, y, _, _ = regression_data(n=60)
    x_test, y_test, _, _ = regression_data(n=15, seed=3)
    return fit(regression_model, regression_guide, (x, y), Trace_ELBO(),
               pyro.optim.Adam({"lr": 0.05}), num_epochs=3, batch_size=12,
               eval_data=(x_test, y_test), progress=False)  # fmt: skip


def test_losses_are_per_point_and_totals_are_named():
    """Check loss = loss_total / N (N = 60) and eval_loss = eval_loss_total / M (M = 15)."""
    result = _run()
    h, eh = result.history, result.epoch_history
    np.testing.assert_allclose(h["loss"], h["loss_total"] / 60, rtol=1e-12)
    np.testing.assert_allclose(eh["eval_loss"], eh["eval_loss_total"] / 15, rtol=1e-12)
    # on one scale: train and held-out per-point losses of a fitted regression are comparable
    assert 0.5 < eh["eval_loss"][-1] / eh["loss"][-1] < 2.0
    assert 0.5 < eh["eval_loss_total"][-1] / eh["loss_total"][-1] * 4 < 2.0  # totals: N/M = 4 apart


def test_repr_is_short():
    """The repr names steps, reason, final losses and parameter shapes, not arrays."""
    text = repr(_run())
    assert text.startswith("FitResult(num_steps=15, num_epochs=3, stop_reason='completed'")
    assert "final_eval_loss=" in text and "loc: (2,)" in text
    assert len(text) < 400 and "array" not in text and "tensor" not in text


def test_plot_draws_like_with_like():
    """The loss panel overlays per-point eval_loss; loss_total gets no held-out overlay."""
    result = _run()
    fig = result.plot()
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "loss_total" not in titles
    _, values = fig.axes[0].get_lines()[-1].get_data()
    np.testing.assert_array_equal(values, result.epoch_history["eval_loss"])
    plt.close(fig)
    fig = result.plot(keys=["loss_total"])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss_total"]
    plt.close(fig)


def test_progress_bar_is_tqdm_auto():
    """The bar comes from tqdm.auto (a widget in notebooks, text on a terminal)."""
    assert loop_module.tqdm is tqdm.auto.tqdm
