"""Reliability tests of DecomposedELBO (issue 13).

MWS terms that can be read, a batch of one refused, a dataset_size that contradicts the plate
refused, a short last batch caught before a run.
"""

from __future__ import annotations

import math

import pytest

from pyro_vi_ext import DecomposedELBO
from tests.infer.test_decomposed import dense_terms, make_table_model, table_problem

TERM_NAMES = ("index_code_mi", "total_correlation", "dimwise_kl")


def test_mws_refuses_a_batch_of_one_that_reported_a_negative_dimwise_kl():
    """Refuse a batch of one under MWS (it reported a negative dim-wise KL)."""
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match=r"Batch size 1 with estimator='mws'.*plate 'data'"):
        DecomposedELBO(1.0, 1.0, 1.0, "mws").loss(model, guide, batch_size=1)  # aggregate="mws"


def test_mws_terms_say_how_they_are_shifted_and_read_unshifted():
    """Report the MWS shifts, and the terms without them.

    The paper's MWS constant moves MI by +log N, TC by +(D-1) log N and the dim-wise KL by
    -D log N; without it the terms are those of the batch-average aggregate posterior.
    """
    n, b, d = 200, 16, 4
    loc, scale, x = table_problem(n, d)
    capture = []
    model, guide = make_table_model(loc, scale, x, capture=capture)
    loss = DecomposedELBO(1.0, 1.0, 1.0, "mws", num_particles=3, max_plate_nesting=1)
    loss.loss(model, guide, batch_size=b)
    log_n = math.log(n)
    expected_shifts = {
        "reconstruction": 0.0,
        "index_code_mi": log_n,
        "total_correlation": (d - 1) * log_n,
        "dimwise_kl": -d * log_n,
        "elbo": 0.0,
    }
    assert loss.last_term_shifts == pytest.approx(expected_shifts, rel=1e-6)
    idx, z = capture[-1]
    paper = dense_terms(z, loc[idx], scale[idx], n, "mws")
    readable = loss.last_terms_unshifted
    for name in TERM_NAMES:
        assert loss.last_terms[name] == pytest.approx(paper[name], rel=1e-4, abs=1e-4), name
        expected = paper[name] - expected_shifts[name]
        assert readable[name] == pytest.approx(expected, rel=1e-4, abs=1e-4), name
    assert 0.0 <= readable["index_code_mi"] <= math.log(b) + 1e-6
    assert loss.last_terms["index_code_mi"] > log_n  # the paper's form reads MI above log N
    assert readable["elbo"] == pytest.approx(loss.last_terms["elbo"])
    # MSS carries no shift
    mss = DecomposedELBO(aggregate="mss", num_particles=3, max_plate_nesting=1)
    mss.loss(model, guide, batch_size=b)
    assert set(mss.last_term_shifts.values()) == {0.0}
    assert mss.last_terms_unshifted == mss.last_terms


def test_dataset_size_that_contradicts_the_plate_names_both_numbers():
    """Refuse a dataset_size that contradicts the plate, naming both sizes and the plate."""
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match=r"dataset_size=50 contradicts plate 'data'.*N = 20"):
        DecomposedELBO(dataset_size=50).loss(model, guide, batch_size=5)
    # agreeing with the plate is fine
    assert math.isfinite(DecomposedELBO(dataset_size=20).loss(model, guide, batch_size=5))


def test_short_last_batch_under_mss_is_caught_before_the_run():
    """Catch a short last batch of one before the run, and say what to do inside it."""
    loss = DecomposedELBO()  # aggregate="mss"
    with pytest.raises(ValueError, match=r"101 points in batches of 50 leave a last batch of 1"):
        loss.check_batching(101, 50)
    loss.check_batching(101, 50, drop_last=True)  # the short batch is dropped
    loss.check_batching(102, 50)  # a last batch of 2 is fine
    with pytest.raises(ValueError, match="batch_size=1"):
        loss.check_batching(100, 1)
    # if a batch of one reaches the loss anyway, the error says what to do about a last batch
    loc, scale, x = table_problem(21, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match=r"Batch size 1 .*short last batch.*drop_last=True"):
        loss.loss(model, guide, batch_size=1)


def test_fit_refuses_a_short_last_batch_before_step_one():
    """``fit`` asks the loss about its minibatches: a last batch of one fails before any step."""
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_vi_ext import fit

    def model(x, *, idx=None, n_data=None):
        with pyro.plate("data", n_data or x.shape[0], subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, *, idx=None, n_data=None):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", n_data or x.shape[0], subsample=idx):
            pyro.sample("z", dist.Normal(loc.expand(x.shape[0], 2), 1.0).to_event(1))

    pyro.clear_param_store()
    calls = []
    with pytest.raises(ValueError, match=r"101 points in batches of 50 leave a last batch of 1"):
        fit(
            model,
            guide,
            torch.randn(101, 2),
            DecomposedELBO(),
            pyro.optim.Adam({"lr": 0.01}),
            num_epochs=1,
            batch_size=50,
            progress=False,
            callbacks=[lambda info: calls.append(info.step)],
        )
    assert calls == []
    # dropping the short batch is the documented way out
    result = fit(
        model,
        guide,
        torch.randn(101, 2),
        DecomposedELBO(),
        pyro.optim.Adam({"lr": 0.01}),
        num_epochs=1,
        batch_size=50,
        drop_last=True,
        progress=False,
    )
    assert len(result.history["loss"]) == 2
