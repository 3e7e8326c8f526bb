"""Reliability tests of the guide diagnostics (issue 13).

No confident number from a guide that cannot serve as an importance proposal, clear errors for
NaN weights and empty batches.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta

from pyro_vi_ext.diagnostics import importance_resample, log_evidence, psis_diagnostic

NUM_POINTS = 5


@pytest.fixture
def data():
    """Provide five observations."""
    return torch.linspace(-1.0, 1.0, NUM_POINTS)


def model(x):
    """Observe x ~ N(z, 1) with z ~ N(0, 1) per point."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def exact_guide(x):
    """Sample the exact posterior N(x / 2, 1/2): every log weight is log p(x), z spreads."""
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))


def point_mass_guide(x):
    """Put a Delta at the posterior mean: no spread, so every log weight is the same number."""
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Delta(x / 2))


def test_log_evidence_flags_a_point_mass_guide_and_trusts_the_exact_one(data):
    """Flag a point-mass guide and trust the exact posterior."""
    with pytest.warns(UserWarning, match=r"site\(s\) 'z' are identical in all 200 draws"):
        flagged = log_evidence(model, point_mass_guide, data, num_samples=200, chunk_size=50)
    assert "'z'" in flagged.proposal_problem
    assert math.isnan(flagged.total_se)  # was 0.0000: a confident number nats from the truth
    np.testing.assert_array_equal(flagged.ess, np.ones(NUM_POINTS))  # was 200: "full ESS"

    # the exact posterior also gives identical log weights, but its draws spread: not flagged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = log_evidence(model, exact_guide, data, num_samples=200, chunk_size=50)
    assert exact.proposal_problem is None
    truth = dist.Normal(0.0, math.sqrt(2.0)).log_prob(data).sum()
    assert exact.total == pytest.approx(float(truth), abs=1e-4)


def test_psis_and_resampling_flag_an_autodelta_guide(data):
    """Flag an AutoDelta guide in k-hat and in resampling."""
    guide = AutoDelta(model)
    with pytest.warns(UserWarning, match="cannot serve as an importance proposal.*'z'"):
        psis = psis_diagnostic(model, guide, data, num_samples=100)
    assert psis.proposal_problem is not None and "'z'" in psis.proposal_problem
    assert np.isinf(psis.khat).all()
    np.testing.assert_array_equal(psis.ess, np.ones(NUM_POINTS))
    with pytest.warns(UserWarning, match="cannot serve as an importance proposal"):
        posterior = importance_resample(model, guide, data, num_samples=20, num_proposals=40)
    assert "'z'" in posterior.psis.proposal_problem
    assert np.isinf(posterior.psis.khat).all()


def test_nan_weights_name_the_site_and_the_cause(data):
    """Name the site with a NaN log-density and the cause."""

    def diverged_model(x):
        """Observe x under a noise scale that diverged to inf: a NaN log-density."""
        noise = pyro.param("noise", torch.tensor(float("inf")))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z * noise, noise), obs=x)

    match = r"NaN in 20 of 20 draws.*model site 'x'.*model or the guide"
    with pytest.raises(ValueError, match=match):
        importance_resample(diverged_model, exact_guide, data, num_samples=10, num_proposals=20)
    with pytest.raises(ValueError, match="model site 'x'"):
        log_evidence(diverged_model, exact_guide, data, num_samples=20)


def test_empty_batch_is_a_clear_error():
    """Refuse an empty batch clearly."""
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="empty batch"):
        importance_resample(model, exact_guide, empty, num_samples=10)
    with pytest.raises(ValueError, match="empty batch"):
        log_evidence(model, exact_guide, empty, num_samples=10)
