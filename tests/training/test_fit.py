"""fit: posterior accuracy, minibatch convention, reproducibility, losses, history, schedules."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.optim import PyroLRScheduler
from torch.utils.data import DataLoader, TensorDataset

import pyro_vi_ext
from pyro_vi_ext.training import Callback, EarlyStopping, FitResult, fit
from tests.training._problems import (
    LocalLatentModel,
    delta_guide,
    regression_data,
    regression_guide,
    regression_model,
)


def _adam(lr=0.05):
    return pyro.optim.Adam({"lr": lr})


def _param_snapshot():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


# ---------------------------------------------------------------------------- posterior accuracy
def test_conjugate_regression_reaches_exact_posterior():
    """Minibatch SVI (B = N/5) with a full-rank guide recovers the exact Gaussian posterior.

    The only error left is optimizer noise of the final iterate: across seeds it is about 0.05
    posterior sd for the mean and 7% for the variances (lr decays to 1.2e-4 per step by the end),
    so the tolerances below are 5 such standard deviations. Dropping the N/B scaling would make the
    variances 5x too large, scaling twice 5x too small.
    """
    x, y, mean, cov = regression_data(n=250)
    optim = pyro.optim.ExponentialLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": 0.05, "betas": (0.9, 0.99)},
            "gamma": 0.97,
        }
    )
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    result = fit(
        regression_model, regression_guide, (x, y), loss, optim,
        num_epochs=100, batch_size=50, seed=0,
    )  # fmt: skip
    assert result.stop_reason == "completed"
    assert result.num_steps == 500 and result.num_epochs == 100
    loc = result.params["loc"]
    scale_tril = result.params["scale_tril"]
    q_cov = scale_tril @ scale_tril.T
    sd = cov.diag().sqrt()
    assert torch.all(((loc - mean) / sd).abs() < 0.25), (loc, mean)
    ratio = q_cov.diag() / cov.diag()
    assert torch.all((ratio - 1).abs() < 0.35), ratio
    corr_err = (q_cov[0, 1] - cov[0, 1]) / (sd[0] * sd[1])
    assert abs(float(corr_err)) < 0.3
    # learning rate decayed once per epoch
    lr = result.history["lr"]
    np.testing.assert_allclose(lr[::5], 0.05 * 0.97 ** np.arange(100), rtol=1e-5)


# ---------------------------------------------------------------------------- minibatch convention
class _Recorder:
    """Guide wrapper that records the arguments of every call."""

    def __init__(self, guide):
        self.guide = guide
        self.calls = []

    def __call__(self, *args, idx=None, n_data=None):
        self.calls.append((tuple(a.clone() for a in args), idx.clone(), n_data))
        return self.guide(*args, idx=idx, n_data=n_data)


@pytest.mark.parametrize("drop_last", [False, True])
def test_minibatch_convention(drop_last):
    """Every step gets x[idx], idx and N; epochs cover the rows once, reshuffled."""
    n, bs, epochs = 23, 5, 3
    x, y, _, _ = regression_data(n=n)
    rec = _Recorder(delta_guide)
    steps_per_epoch = n // bs if drop_last else math.ceil(n / bs)
    result = fit(
        regression_model, rec, (x, y), Trace_ELBO(), _adam(),
        num_epochs=epochs, batch_size=bs, drop_last=drop_last, seed=3,
    )  # fmt: skip
    assert result.num_steps == epochs * steps_per_epoch
    calls = rec.calls[-result.num_steps :]  # earlier calls: fit's parameter set-up pass
    orders = []
    for e in range(epochs):
        epoch_calls = calls[e * steps_per_epoch : (e + 1) * steps_per_epoch]
        for (xb, yb), idx, n_data in epoch_calls:
            assert n_data == n
            assert idx.dtype == torch.long
            assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        sizes = [c[1].numel() for c in epoch_calls]
        order = torch.cat([c[1] for c in epoch_calls])
        if drop_last:
            assert sizes == [bs] * steps_per_epoch
            assert len(set(order.tolist())) == order.numel() == steps_per_epoch * bs
        else:
            assert sizes == [bs] * (steps_per_epoch - 1) + [n - bs * (steps_per_epoch - 1)]
            assert sorted(order.tolist()) == list(range(n))  # every row exactly once
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    assert np.array_equal(result.history["epoch"], np.repeat(np.arange(epochs), steps_per_epoch))
    assert np.array_equal(result.history["step"], np.arange(1, result.num_steps + 1))


def test_no_shuffle_and_full_batch():
    """shuffle=False keeps the order; no batch size means full batch, scale 1."""
    x, y, _, _ = regression_data(n=12)
    rec = _Recorder(delta_guide)
    fit(regression_model, rec, (x, y), Trace_ELBO(), _adam(), num_epochs=2, batch_size=5,
        shuffle=False)  # fmt: skip
    orders = [c[1].tolist() for c in rec.calls[-6:]]
    assert orders[:3] == [list(range(0, 5)), list(range(5, 10)), [10, 11]]
    assert orders[3:] == orders[:3]
    pyro.clear_param_store()
    rec = _Recorder(delta_guide)
    result = fit(regression_model, rec, (x, y), Trace_ELBO(), _adam(), num_steps=3)
    assert result.num_epochs == 3  # full batch: one step per epoch, scale N/N = 1
    for (xb, _), idx, n_data in rec.calls[-3:]:
        assert torch.equal(idx, torch.arange(12)) and n_data == 12 and torch.equal(xb, x)


def test_minibatch_scaling_is_unbiased():
    """Averaged over an epoch's minibatches, the N/B-scaled loss equals the full-data loss."""
    x, y, _, _ = regression_data(n=30)
    pyro.param("loc", torch.tensor([0.3, -0.7]))
    full = Trace_ELBO().loss(regression_model, delta_guide, x, y)
    losses = []

    def frozen_guide(x, y=None, *, idx=None, n_data=None):
        loc = pyro.param("loc").detach()
        pyro.sample("w", dist.Delta(loc).to_event(1))

    class _Keep(Callback):
        def on_step_end(self, info):
            losses.append(info.values["loss_total"])

    fit(regression_model, frozen_guide, (x, y), Trace_ELBO(), _adam(), num_epochs=1,
        batch_size=6, callbacks=[_Keep()])  # fmt: skip
    assert len(losses) == 5
    assert np.mean(losses) == pytest.approx(full, rel=1e-5)


# ---------------------------------------------------------------------------- reproducibility
def _short_run(data, seed=0, **kw):
    pyro.clear_param_store()
    return fit(regression_model, regression_guide, data, Trace_ELBO(), _adam(),
               num_steps=12, batch_size=8, seed=seed, **kw)  # fmt: skip


def test_reproducible_from_seed():
    """Same seed, same run; another seed, another run; seed=None is recorded."""
    x, y, _, _ = regression_data(n=40)
    a, b, c = _short_run((x, y), seed=5), _short_run((x, y), seed=5), _short_run((x, y), seed=6)
    assert np.array_equal(a.history["loss"], b.history["loss"])
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    assert not np.array_equal(a.history["loss"], c.history["loss"])
    assert a.seed == 5
    d = _short_run((x, y), seed=None)
    assert isinstance(d.seed, int) and 0 <= d.seed < 2**32


def test_data_forms_give_identical_runs():
    """Tensors, tuples, dicts, Datasets and DataLoaders yield the same minibatches and run."""
    x, y, _, _ = regression_data(n=40)
    ref = _short_run((x, y))
    runs = {
        "list": _short_run([x, y]),
        "dataset": _short_run(TensorDataset(x, y)),
        "loader": _short_run(DataLoader(TensorDataset(x, y), batch_size=8)),
    }

    def kw_model(*, x, y, idx=None, n_data=None):
        regression_model(x, y, idx=idx, n_data=n_data)

    def kw_guide(*, x, y, idx=None, n_data=None):
        regression_guide(x, y, idx=idx, n_data=n_data)

    pyro.clear_param_store()
    runs["dict"] = fit(kw_model, kw_guide, {"x": x, "y": y}, Trace_ELBO(), _adam(), num_steps=12,
                       batch_size=8, seed=0)  # fmt: skip
    for name, run in runs.items():
        assert np.array_equal(run.history["loss"], ref.history["loss"]), name
        for k in ref.params:
            assert torch.equal(run.params[k], ref.params[k]), name


def test_single_tensor_unsupervised_data():
    """One tensor of data trains an amortized model."""
    lm = LocalLatentModel()
    x = lm.data(n=32)
    result = fit(lm.model, lm.guide, x, Trace_ELBO(), _adam(0.02), num_steps=5, batch_size=8)
    assert result.history["loss"].shape == (5,)
    assert "encoder$$$weight" in result.params and "W" in result.params


# ---------------------------------------------------------------------------- every loss
def _package_loss(name, **kw):
    cls = getattr(pyro_vi_ext, name, None)
    if cls is None:
        pytest.skip(f"pyro_vi_ext.{name} is not importable yet")
    return cls(**kw)


LOSSES = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "TraceGraph_ELBO": lambda: TraceGraph_ELBO(),
    "RenyiELBO": lambda: RenyiELBO(alpha=0.5, num_particles=2),
    "ImportanceWeightedELBO": lambda: _package_loss(
        "ImportanceWeightedELBO", num_particles=4, max_plate_nesting=1
    ),
    "DecomposedELBO": lambda: _package_loss("DecomposedELBO"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_trains_through_fit(name):
    """Pyro's and this package's losses train, evaluate and log their terms."""
    loss = LOSSES[name]()
    lm = LocalLatentModel()
    x = lm.data(n=96)
    x_test = lm.data(n=32, seed=11)
    result = fit(lm.model, lm.guide, x, loss, _adam(0.03), num_epochs=10, batch_size=32, seed=0,
                 eval_data=x_test, eval_batch_size=16)  # fmt: skip
    assert result.stop_reason == "completed", result.message
    h = result.history
    assert h["loss"].shape == (30,) and np.all(np.isfinite(h["loss"]))
    assert h["loss"][-6:].mean() < h["loss"][:6].mean()  # it learns
    assert np.all(np.isfinite(result.epoch_history["eval_loss"]))
    terms = getattr(loss, "last_terms", None)
    if terms is not None:  # every reported term is logged per step and per epoch
        for key in terms:
            key = f"term_{key}" if key in ("step", "epoch", "loss", "lr", "grad_norm") else key
            assert h[key].shape == (30,), key
            assert result.epoch_history[key].shape == (10,)
            assert f"eval_{key}" in result.epoch_history


# ---------------------------------------------------------------------------- terms and history
class _TermsELBO(Trace_ELBO):
    """Trace_ELBO that reports terms and records set_step calls, like this package's losses."""

    def __init__(self):
        super().__init__()
        self.steps_seen = []
        self.current = None

    def set_step(self, step):
        self.current = step
        self.steps_seen.append(step)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        value = super().loss_and_grads(model, guide, *args, **kwargs)
        self.last_terms = {"elbo": -value, "schedule": float(self.current), "loss": 2 * value}
        return value

    def loss(self, model, guide, *args, **kwargs):
        value = super().loss(model, guide, *args, **kwargs)
        self.last_terms = {"elbo": -value, "schedule": -1.0, "loss": 2 * value}
        return value


def test_terms_set_step_and_history_arrays():
    """Terms, set_step, epoch means and read-only arrays in the history."""
    x, y, _, _ = regression_data(n=40)
    x_test, y_test, _, _ = regression_data(n=20, seed=7)
    loss = _TermsELBO()
    result = fit(regression_model, regression_guide, (x, y), loss, _adam(), num_epochs=3,
                 batch_size=10, eval_data=(x_test, y_test))  # fmt: skip
    h, eh = result.history, result.epoch_history
    assert set(h) == {
        "step", "epoch", "loss", "loss_total", "lr", "grad_norm", "elbo", "schedule", "term_loss"
    }  # fmt: skip
    assert np.all(h["grad_norm"] > 0)
    assert all(isinstance(v, np.ndarray) for v in h.values())
    assert h["step"].dtype == np.int64 and h["loss"].dtype == np.float64
    np.testing.assert_array_equal(h["elbo"], -h["loss_total"])
    np.testing.assert_array_equal(h["term_loss"], 2 * h["loss_total"])
    np.testing.assert_array_equal(h["schedule"], np.arange(12))  # set_step(completed steps)
    assert loss.steps_seen[-12:] == list(range(12))
    np.testing.assert_allclose(eh["loss"], h["loss"].reshape(3, 4).mean(1))
    np.testing.assert_array_equal(eh["epoch"], [1, 2, 3])
    np.testing.assert_array_equal(eh["step"], [4, 8, 12])
    np.testing.assert_array_equal(eh["eval_elbo"], -eh["eval_loss_total"])
    np.testing.assert_array_equal(eh["eval_schedule"], [-1.0, -1.0, -1.0])
    with pytest.raises((TypeError, ValueError)):
        h["loss"][0] = 0.0  # read-only arrays
    with pytest.raises(TypeError):
        h["new"] = np.zeros(1)  # read-only mapping
    with pytest.raises(AttributeError):
        result.num_steps = 3  # frozen dataclass
    assert isinstance(result, FitResult) and result.final_loss == h["loss"][-1]


def test_evaluation_is_exact_and_does_not_perturb_training():
    """With a point-mass guide the held-out loss is exact, whatever the eval batch size."""
    x, y, _, _ = regression_data(n=40)
    x_test, y_test, _, _ = regression_data(n=25, seed=9)
    common = dict(num_epochs=4, batch_size=10, seed=2)
    plain = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), _adam(), **common)
    pyro.clear_param_store()
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), _adam(), **common,
                 eval_data=(x_test, y_test), eval_batch_size=7, eval_every=2)  # fmt: skip
    np.testing.assert_array_equal(plain.history["loss"], result.history["loss"])
    ev = result.epoch_history["eval_loss_total"]
    assert np.isnan(ev[0]) and np.isnan(ev[2]) and np.isfinite(ev[1])
    w = result.params["loc"]
    exact = -(
        dist.Normal((x_test * w).sum(-1), 1.0).log_prob(y_test).sum()
        + dist.Normal(0.0, 1.0).log_prob(w).sum()
    )
    assert ev[3] == pytest.approx(float(exact), rel=1e-5)


def test_stochastic_guide_evaluation_does_not_perturb_training():
    """Evaluation leaves a stochastic guide's training draws unchanged."""
    x, y, _, _ = regression_data(n=40)
    plain = _short_run((x, y))
    with_eval = _short_run((x, y), eval_data=(x[:10], y[:10]))
    np.testing.assert_array_equal(plain.history["loss"], with_eval.history["loss"])
    assert with_eval.epoch_history["eval_loss"].shape == (2,)


# ---------------------------------------------------------------------------- progress bar
def test_progress_bar_only_when_asked_or_on_a_terminal(capsys):
    """The bar shows only when asked for or on a terminal."""
    x, y, _, _ = regression_data(n=20)
    fit(regression_model, regression_guide, (x, y), _TermsELBO(), _adam(), num_steps=4,
        batch_size=10)  # fmt: skip
    assert "step" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    fit(regression_model, regression_guide, (x, y), _TermsELBO(), _adam(), num_steps=4,
        batch_size=10, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=" in err and "elbo=" in err
    fit(regression_model, regression_guide, (x, y), _TermsELBO(), _adam(), num_steps=4,
        batch_size=10, progress=False)  # fmt: skip
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- schedules, clipping
def _inverse(step):
    return 1 / (1 + step)


def test_torch_scheduler_per_step():
    """A torch LambdaLR stepped every step."""
    x, y, _, _ = regression_data(n=20)
    optim = PyroLRScheduler(
        torch.optim.lr_scheduler.LambdaLR,
        {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.01}, "lr_lambda": _inverse},
    )
    result = fit(regression_model, regression_guide, (x, y), Trace_ELBO(), optim, num_steps=6,
                 batch_size=10, scheduler_interval="step")  # fmt: skip
    np.testing.assert_allclose(result.history["lr"], 0.01 / (1 + np.arange(6)))


def test_reduce_on_plateau_with_monitor():
    """ReduceLROnPlateau needs a monitor and halves the rate as told."""
    x, y, _, _ = regression_data(n=20)
    optim = pyro.optim.ReduceLROnPlateau(
        {"optimizer": torch.optim.SGD, "optim_args": {"lr": 1e-3}, "factor": 0.5, "patience": 0,
         "threshold": 10.0, "threshold_mode": "rel"}  # never an "improvement" after the first
    )  # fmt: skip
    with pytest.raises(ValueError, match="scheduler_monitor"):
        fit(regression_model, delta_guide, (x, y), Trace_ELBO(), optim, num_epochs=4, batch_size=10)
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), optim, num_epochs=4,
                 batch_size=10, scheduler_monitor="loss")  # fmt: skip
    np.testing.assert_allclose(result.epoch_history["lr"], [1e-3, 5e-4, 2.5e-4, 1.25e-4])


def test_gradient_clipping():
    """clip_norm and clip_value bound the step; grad_norm is the raw norm."""
    x, y, _, _ = regression_data(n=20)
    sgd = pyro.optim.SGD({"lr": 1.0})
    pyro.param("loc", torch.zeros(2))
    start = pyro.param("loc").detach().clone()
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), sgd, num_steps=1,
                 clip_norm=0.5)  # fmt: skip
    assert result.history["grad_norm"][0] > 5  # the raw gradient was large ...
    moved = result.params["loc"] - start
    assert float(moved.norm()) == pytest.approx(0.5, rel=1e-5)  # ... and the step was clipped
    pyro.clear_param_store()
    pyro.param("loc", torch.zeros(2))
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), pyro.optim.SGD({"lr": 1.0}),
                 num_steps=1, clip_value=0.1)  # fmt: skip
    assert torch.allclose(result.params["loc"].abs(), torch.full((2,), 0.1))
    pyro.clear_param_store()
    pyro.param("loc", torch.zeros(2))
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), pyro.optim.SGD({"lr": 1e-3}),
                 num_steps=1)  # fmt: skip
    # unclipped SGD moves by lr * gradient: the logged norm is the gradient's norm
    moved = float(result.params["loc"].norm()) / 1e-3
    assert result.history["grad_norm"][0] == pytest.approx(moved, rel=1e-4)


# ---------------------------------------------------------------------------- callbacks
def test_callbacks_hooks_and_stop():
    """Hooks are called in order and a function callback can stop training."""
    x, y, _, _ = regression_data(n=20)
    events = []

    class Hooks(Callback):
        def on_fit_start(self, info):
            events.append(("start", info.start_step, info.total_steps, info.steps_per_epoch))

        def on_step_end(self, info):
            events.append(("step", info.step, info.epoch))

        def on_epoch_end(self, info):
            events.append(("epoch", info.epoch, info.step, "loss" in info.values))

        def on_fit_end(self):
            events.append(("end",))

    def stop_at_7(info):
        return info.step == 7

    result = fit(regression_model, regression_guide, (x, y), Trace_ELBO(), _adam(), num_steps=20,
                 batch_size=5, callbacks=[Hooks(), stop_at_7])  # fmt: skip
    assert result.stop_reason == "callback" and result.num_steps == 7
    assert "stop_at_7" in result.message and "step 7" in result.message
    assert events[0] == ("start", 0, 20, 4)
    assert [e[1] for e in events if e[0] == "step"] == list(range(1, 8))
    assert [e for e in events if e[0] == "epoch"] == [("epoch", 1, 4, True)]
    assert events[-1] == ("end",)


def test_early_stopping_on_held_out_loss():
    """EarlyStopping on eval_loss stops after `patience` flat epochs."""
    x, y, _, _ = regression_data(n=20)
    frozen = pyro.optim.SGD({"lr": 0.0})  # nothing improves after the first epoch
    stopper = EarlyStopping("eval_loss", patience=2)
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), frozen, num_epochs=10,
                 batch_size=10, eval_data=(x, y), callbacks=[stopper])  # fmt: skip
    assert result.stop_reason == "early_stopping"
    assert result.num_epochs == 3 and result.num_steps == 6
    assert "eval_loss did not improve" in result.message


def test_early_stopping_restores_best_parameters():
    """restore_best puts the best epoch's parameters back."""
    x, y, _, _ = regression_data(n=20)
    snapshots = {}

    class Snap(Callback):
        def on_epoch_end(self, info):
            snapshots[info.epoch] = _param_snapshot()

    # "max" on a decreasing training loss: the best is epoch 1, the stop comes at epoch 3
    stopper = EarlyStopping("loss", patience=2, mode="max", restore_best=True)
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), _adam(0.1), num_epochs=10,
                 batch_size=10, callbacks=[Snap(), stopper])  # fmt: skip
    assert result.num_epochs == 3 and stopper.best_step == 2
    assert torch.equal(result.params["loc"], snapshots[1]["loc"])
    assert not torch.equal(snapshots[3]["loc"], snapshots[1]["loc"])


def test_early_stopping_step_interval_and_unknown_key():
    """Step-interval stopping works; an unknown key is named."""
    x, y, _, _ = regression_data(n=20)
    stopper = EarlyStopping("loss", patience=1, interval="step", min_delta=1e9)
    result = fit(regression_model, delta_guide, (x, y), Trace_ELBO(), _adam(), num_steps=10,
                 batch_size=10, callbacks=[stopper])  # fmt: skip
    assert result.num_steps == 2 and result.stop_reason == "early_stopping"
    pyro.clear_param_store()
    with pytest.raises(KeyError, match="nope"):
        fit(regression_model, delta_guide, (x, y), Trace_ELBO(), _adam(), num_steps=3,
            batch_size=10, callbacks=[EarlyStopping("nope", interval="step")])  # fmt: skip


# ---------------------------------------------------------------------------- input validation
class _NoKwargsModel:
    def __call__(self, x, y=None):
        return None


def _bad_calls():
    x, y, _, _ = regression_data(n=10)
    m, g, L, O = regression_model, regression_guide, Trace_ELBO(), _adam()  # noqa: N806
    nan_x = x.clone()
    nan_x[3, 1] = float("nan")
    return [
        ((m, g, (x, y), L, O), {}, ValueError, "num_steps"),
        ((m, g, (x, y), L, O), {"num_steps": 2, "num_epochs": 2}, ValueError, "only one"),
        ((m, g, (x, y), L, O), {"num_steps": 0}, ValueError, "`num_steps`"),
        ((m, g, x.numpy(), L, O), {"num_steps": 1}, TypeError, "`data`.*torch.as_tensor"),
        ((m, g, [x, "y"], L, O), {"num_steps": 1}, TypeError, "`data`"),
        ((m, g, (nan_x, y), L, O), {"num_steps": 1}, ValueError, "`data` contains 1 NaN"),
        ((m, g, (x, y[:5]), L, O), {"num_steps": 1}, ValueError, "same first dimension"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "batch_size": 0}, ValueError, "`batch_size`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "batch_size": 11}, ValueError, "`batch_size`"),
        ((m, g, (x, y), "elbo", O), {"num_steps": 1}, TypeError, "`loss`"),
        ((m, g, (x, y), L, torch.optim.Adam), {"num_steps": 1}, TypeError, "`optim`.*pyro.optim"),
        ((_NoKwargsModel(), g, (x, y), L, O), {"num_steps": 1}, TypeError, "`model`.*idx"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "eval_loss": L}, ValueError, "`eval_data`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "eval_data": (x, nan_x)}, ValueError,
         "`eval_data` contains"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "checkpoint_every": 2}, ValueError, "`checkpoint`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "resume": True}, ValueError, "`checkpoint`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "seed": -1}, ValueError, "`seed`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "clip_norm": 0.0}, ValueError, "`clip_norm`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "callbacks": [EarlyStopping()]}, ValueError,
         "eval_data"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "scheduler_monitor": "loss"}, ValueError,
         "PyroLRScheduler"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "callbacks": [3]}, TypeError, "`callbacks`"),
        ((m, g, (x, y), L, O), {"num_steps": 1, "resume": "/nonexistent/ckpt.pt"},
         FileNotFoundError, "`resume`"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_early_and_names_the_argument(case):
    """Each bad argument raises before training, naming the argument."""
    args, kwargs, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        fit(*args, **kwargs)
    assert len(pyro.get_param_store().keys()) == 0  # raised before any training


def test_device_argument():
    """device='cpu' works; CUDA without CUDA is refused clearly."""
    x, y, _, _ = regression_data(n=10)
    result = fit(regression_model, regression_guide, (x, y), Trace_ELBO(), _adam(), num_steps=2,
                 device="cpu")  # fmt: skip
    assert result.params["loc"].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device`.*CUDA is not available"):
            fit(regression_model, regression_guide, (x, y), Trace_ELBO(), _adam(), num_steps=2,
                device="cuda")  # fmt: skip


def test_iterable_dataset_is_rejected():
    """An IterableDataset is refused with the reason."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(2)

    with pytest.raises(TypeError, match="`data` is an IterableDataset"):
        fit(regression_model, regression_guide, Stream(), Trace_ELBO(), _adam(), num_steps=1)
