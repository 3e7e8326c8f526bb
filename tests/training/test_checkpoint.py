"""fit: checkpoints, interrupt-then-resume, non-finite losses."""

from __future__ import annotations

import os
import signal
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vi_ext.training import EarlyStopping, fit, load_checkpoint
from pyro_vi_ext.training.checkpoint import save_checkpoint
from tests.training._problems import (
    LocalLatentModel,
    regression_data,
    regression_guide,
    regression_model,
)

N_STEPS = 30  # 3 epochs of 10 steps


class _Run:
    """One training configuration, rebuilt from scratch for every call (as a new process would)."""

    def __init__(self):
        self.lm = LocalLatentModel()
        self.x = self.lm.data(n=80)
        self.x_test = self.lm.data(n=16, seed=5)
        self.init = {k: v.clone() for k, v in self.lm.encoder.state_dict().items()}

    def __call__(self, extra_callbacks=(), **kw):
        pyro.clear_param_store()
        self.lm.encoder.load_state_dict(self.init)  # fresh module weights, as in a new process
        optim = pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.02}, "gamma": 0.9}
        )
        callbacks = [EarlyStopping("eval_loss", patience=100), *extra_callbacks]
        return fit(self.lm.model, self.lm.guide, self.x, Trace_ELBO(num_particles=2), optim,
                   num_steps=N_STEPS, batch_size=8, seed=4, eval_data=self.x_test,
                   callbacks=callbacks, **kw)  # fmt: skip


def _raise_at(k):
    state = {"armed": True}

    def interrupt(info):
        if state["armed"] and info.step == k:
            state["armed"] = False
            raise KeyboardInterrupt

    return interrupt


def _sigint_at(k):
    state = {"armed": True}

    def interrupt(info):
        if state["armed"] and info.step == k:
            state["armed"] = False
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered mid-run

    return interrupt


def _assert_same(a, b):
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    for hist_a, hist_b in ((a.history, b.history), (a.epoch_history, b.epoch_history)):
        assert hist_a.keys() == hist_b.keys()
        for k in hist_a:
            np.testing.assert_array_equal(hist_a[k], hist_b[k], err_msg=k)


@pytest.fixture(scope="module")
def run_and_reference(tmp_path_factory):
    """Build the run configuration and its uninterrupted reference result."""
    pyro.set_rng_seed(0)
    run = _Run()
    path = tmp_path_factory.mktemp("ref") / "ref.pt"
    reference = run(checkpoint=path)
    assert reference.stop_reason == "completed" and reference.num_steps == N_STEPS
    return run, reference


@pytest.mark.parametrize(
    "how, k",
    [("raise", 13), ("raise", 20), ("sigint", 7), ("sigint", 10)],
    ids=["raise-mid-epoch", "raise-at-epoch-end", "sigint-mid-epoch", "sigint-at-epoch-end"],
)
def test_interrupt_then_resume_equals_uninterrupted(run_and_reference, tmp_path, how, k):
    """Interrupt (raise or SIGINT) then resume: bit-identical to no interruption."""
    run, reference = run_and_reference
    path = tmp_path / "ckpt.pt"
    stopper = _raise_at(k) if how == "raise" else _sigint_at(k)
    partial = run(extra_callbacks=[stopper], checkpoint=path, checkpoint_every=4)
    assert partial.stop_reason == "interrupted", partial.message
    assert partial.num_steps == k and len(partial.history["loss"]) == k
    assert str(path) in partial.message
    np.testing.assert_array_equal(partial.history["loss"], reference.history["loss"][:k])
    assert load_checkpoint(path)["step"] == k
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed = run(extra_callbacks=[stopper], checkpoint=path, resume=True)
    assert resumed.stop_reason == "completed" and resumed.num_steps == N_STEPS
    _assert_same(resumed, reference)  # bit for bit: parameters and the whole history


def test_keyboard_interrupt_without_checkpoint_returns_partial_result(run_and_reference):
    """Without a checkpoint an interrupt still returns the partial result."""
    run, reference = run_and_reference
    partial = run(extra_callbacks=[_raise_at(5)])
    assert partial.stop_reason == "interrupted" and partial.num_steps == 5
    assert partial.checkpoint is None
    assert torch.equal(
        partial.params["W"], pyro.get_param_store()["W"]
    )  # the store holds the partial state too


def test_checkpoint_content_loads_weights_only(run_and_reference, tmp_path):
    """The checkpoint holds what the format promises and loads weights-only."""
    run, reference = run_and_reference
    path = tmp_path / "c.pt"
    seen = {}

    def peek(info):
        if info.step == 11:  # the checkpoint of step 10 is on disk
            seen["step"] = load_checkpoint(path)["step"]

    result = run(extra_callbacks=[peek], checkpoint=path, checkpoint_every=5)
    assert seen["step"] == 10
    assert result.checkpoint == str(path)
    state = torch.load(path, weights_only=True)  # the safe loader accepts everything in it
    assert state["format"] == "pyro_vi_ext.fit/1"
    assert state["step"] == N_STEPS and state["epoch"] == 3 and state["step_in_epoch"] == 0
    assert state["seed"] == 4 and state["world_size"] == 1 and len(state["rng"]) == 1
    assert set(state["params"]) == set(result.params)
    assert set(state["optim"]) == set(result.params)  # one optimizer state per parameter
    assert "scheduler" in state["optim"]["W"]
    np.testing.assert_array_equal(state["history"]["loss"].numpy(), result.history["loss"])
    assert state["callbacks"]["EarlyStopping"]["best_step"] >= 10
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic write


def test_resume_edge_cases(run_and_reference, tmp_path):
    """Resume without a file, of a finished run, with another batch size, of a foreign file."""
    run, reference = run_and_reference
    path = tmp_path / "c.pt"
    fresh = run(checkpoint=path, resume=True)  # no file yet: starts afresh
    _assert_same(fresh, reference)
    again = run(checkpoint=path, resume=True)  # a finished run: nothing left to do
    assert again.num_steps == N_STEPS
    _assert_same(again, reference)
    with pytest.raises(ValueError, match="`resume`.*batch_size"):
        pyro.clear_param_store()
        fit(run.lm.model, run.lm.guide, run.x, Trace_ELBO(), pyro.optim.Adam({"lr": 0.01}),
            num_steps=40, batch_size=16, resume=path, seed=4)  # fmt: skip
    with pytest.raises(ValueError, match="not a checkpoint"):
        torch.save({"step": 3}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


# ---------------------------------------------------------------------------- non-finite values
def _poisoned(k, where="loss"):
    """Build a regression model that produces a NaN loss (or an infinite gradient) at step k."""
    state = {"completed": 0}

    def model(x, y=None, *, idx=None, n_data=None):
        regression_model(x, y, idx=idx, n_data=n_data)
        if state["completed"] == k - 1:
            if where == "loss":
                with pyro.validation_enabled(False):
                    pyro.factor("poison", torch.tensor(float("nan")))
            elif where == "distribution":  # validation rejects the NaN parameter with ValueError
                pyro.sample("poison", dist.Normal(torch.tensor(float("nan")), 1.0), obs=0.0)
            else:  # finite loss (0) whose gradient is infinite: d sqrt(u) / du at u = 0
                loc = pyro.param("loc")
                pyro.factor("poison", torch.sqrt((loc - loc.detach()).abs()).sum())

    def count(info):
        state["completed"] = info.step

    return model, count, state


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own notice of the injected NaN
@pytest.mark.parametrize("where", ["loss", "distribution", "gradient"])
def test_non_finite_stops_with_previous_parameters(tmp_path, where):
    """A NaN loss, invalid distribution or infinite gradient stops with step k-1's state."""
    x, y, _, _ = regression_data(n=40)
    k = 7
    model, count, _ = _poisoned(k, where)
    path = tmp_path / "c.pt"
    what = {"loss": "loss", "distribution": "loss .*invalid values", "gradient": "gradient"}[where]
    with pytest.warns(RuntimeWarning, match=f"non-finite {what}.* at step {k}"):
        result = fit(model, regression_guide, (x, y), Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}),
                     num_steps=20, batch_size=8, seed=1, callbacks=[count], checkpoint=path,
                     checkpoint_every=5)  # fmt: skip
    assert result.stop_reason == "non_finite"
    assert f"step {k}" in result.message and f"after step {k - 1}" in result.message
    assert result.num_steps == k - 1 and len(result.history["loss"]) == k - 1
    assert np.all(np.isfinite(result.history["loss"]))

    # the parameters are exactly those of a clean run stopped after k - 1 steps
    pyro.clear_param_store()
    clean_model, clean_count, _ = _poisoned(10**9)
    clean = fit(clean_model, regression_guide, (x, y), Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}),
                num_steps=k - 1, batch_size=8, seed=1, callbacks=[clean_count])  # fmt: skip
    for name in clean.params:
        assert torch.equal(result.params[name], clean.params[name]), name
        assert torch.equal(pyro.get_param_store()[name], clean.params[name])  # store too
    # the checkpoint of step 5 is kept, finite and loadable; nothing was written after
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    assert str(path) in result.message


def test_save_refuses_non_finite_parameters(tmp_path):
    """save_checkpoint refuses NaN parameters and keeps the good file."""
    path = tmp_path / "c.pt"
    good = {"step": 1, "params": {"a": torch.ones(2)}, "format": "pyro_vi_ext.fit/1"}
    assert save_checkpoint(path, good)
    bad = {"step": 2, "params": {"a": torch.tensor([1.0, float("inf")])}}
    with pytest.warns(RuntimeWarning, match="step 2.*not written"):
        assert not save_checkpoint(path, bad)
    assert load_checkpoint(path)["step"] == 1  # the good one survives


def test_model_parameters_and_module_state_resume(tmp_path):
    """nn.Module weights registered with pyro.module are restored in place from checkpoints."""
    lm = LocalLatentModel()
    x = lm.data(n=32)
    path = tmp_path / "c.pt"
    fit(lm.model, lm.guide, x, Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}), num_steps=4,
        batch_size=8, checkpoint=path)  # fmt: skip
    trained = lm.encoder.weight.detach().clone()
    with torch.no_grad():
        lm.encoder.weight.zero_()
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(lm.model, lm.guide, x, Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}), num_steps=4,
            batch_size=8, resume=path)  # fmt: skip
    assert torch.equal(lm.encoder.weight, trained)
