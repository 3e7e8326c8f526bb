"""Result objects print one short line, arrays by shape (issue 14)."""

import numpy as np

from models.linear_regression import FixedGaussianGuide
from pyro_vi_ext.diagnostics import EvidenceResult, log_evidence, psis_diagnostic


def test_evidence_repr_shows_numbers_and_array_shapes():
    """A 10,000-point result prints its totals and the shapes of its arrays, not the arrays."""
    big = np.arange(10_000.0)
    result = EvidenceResult(-12.345678, 0.5, big, big, big, 100)
    text = repr(result)
    assert text.startswith("EvidenceResult(total=-12.35, total_se=0.5, per_point=array[10000]")
    assert len(text) < 300


def test_diagnostics_results_repr_is_one_short_line(regression):
    """``log_evidence`` and ``psis_diagnostic`` results print one line of bounded length."""
    guide = FixedGaussianGuide(regression.mean, regression.cov)  # the exact posterior
    for result in (
        log_evidence(regression.model, guide, *regression.args, num_samples=64),
        psis_diagnostic(regression.model, guide, *regression.args, num_samples=64),
    ):
        text = repr(result)
        assert "\n" not in text and len(text) < 400
