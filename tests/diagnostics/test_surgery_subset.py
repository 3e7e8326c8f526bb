"""Tests of elbo_surgery's reference-subset mode (``reference_size=M``).

Against a hand-written torch evaluation on the same random subsets (values, bias correction and
subset variance), against the exact mode on the same codes (M = N - 1 reproduces it; smaller M
lands within 3 standard errors; the 95% intervals cover it), its RNG use and its errors.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vi_ext.diagnostics import SURGERY_TERMS, elbo_surgery
from pyro_vi_ext.diagnostics._reference_subset import (
    points_per_reference_block,
    subset_log_aggregate,
)
from tests.infer.test_decomposed import make_table_model, table_problem

AGGREGATE_TERMS = ("index_code_mi", "total_correlation", "dimwise_kl", "marginal_kl")


def hand_written_subset(z, loc, scale, m: int, seed: int):
    """Evaluate the subset estimator point by point, with the same subsets as the module.

    Returns the corrected ``log q(z)`` ``[S, N]``, ``log q(z_d)`` ``[S, N, D]`` and the subset
    variance of each aggregate term's mean.
    """
    z, loc, scale = z.double(), loc.double(), scale.double()
    num_samples, n, d = z.shape
    gen = torch.Generator().manual_seed(seed)
    fpc = 1 - m / (n - 1)
    joint_out = torch.empty(num_samples, n, dtype=torch.float64)
    marg_out = torch.empty(num_samples, n, d, dtype=torch.float64)
    variances = dict.fromkeys(AGGREGATE_TERMS, 0.0)
    block = points_per_reference_block(n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        ref = torch.randperm(n, generator=gen)[: m + 1]
        col_joint = torch.zeros(m + 1, dtype=torch.float64)
        col_marg = torch.zeros(m + 1, dtype=torch.float64)
        for i in range(start, stop):
            hits = (ref == i).nonzero().flatten()
            used = torch.ones(m + 1, dtype=torch.bool)
            used[hits[0] if len(hits) else m] = False
            q_own = torch.distributions.Normal(loc[i], scale[i]).log_prob(z[:, i]).exp()  # [S, D]
            q_ref = torch.distributions.Normal(loc[ref], scale[ref]).log_prob(z[:, i, None]).exp()
            q_ref = q_ref * used[None, :, None]  # [S, M+1, D]
            for values, own, out, cols in (
                (q_ref.prod(-1), q_own.prod(-1), joint_out, col_joint),  # joint [S, M+1]
                (q_ref.transpose(1, 2), q_own, marg_out, col_marg),  # marginals [S, D, M+1]
            ):
                q_hat = (own + (n - 1) / m * values.sum(-1)) / n
                rho = (n - 1) / (n * m) * values / q_hat[..., None]
                var = fpc * (m * (rho**2).sum(-1) - rho.sum(-1) ** 2) / (m - 1)
                out[:, i] = q_hat.log() + var / 2
                cols += m * (rho.sum(tuple(range(rho.dim() - 1))))
        count = num_samples * (stop - start)
        col_joint, col_marg = col_joint / count, col_marg / count
        columns = {
            "index_code_mi": -col_joint,
            "total_correlation": col_joint - col_marg,
            "dimwise_kl": col_marg,
            "marginal_kl": col_joint,
        }
        for term, values in columns.items():
            variances[term] += ((stop - start) / n) ** 2 * fpc * float(values.var()) / m
    return joint_out, marg_out, variances


@pytest.mark.parametrize("num_samples, n", [(1, 100), (2, 50)])
def test_estimator_matches_hand_written_torch(num_samples, n):
    """Match the point-by-point estimator on the same subsets: values and subset variances."""
    d, m = 3, 20
    loc, scale, _ = table_problem(n, d, rho=0.5, scale=0.8)
    gen = torch.Generator().manual_seed(3)
    z = loc + scale * torch.randn(num_samples, n, d, generator=gen)
    estimate = subset_log_aggregate(
        z.double(), loc[None].double(), scale[None].double(), m, torch.Generator().manual_seed(7)
    )
    joint, marg, variances = hand_written_subset(z, loc, scale, m, seed=7)
    torch.testing.assert_close(estimate.log_aggregate, joint, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(estimate.log_marginals, marg, rtol=1e-10, atol=1e-10)
    for term in AGGREGATE_TERMS:
        assert estimate.variances[term] == pytest.approx(variances[term], rel=1e-8), term
        assert estimate.variances[term] > 0
    assert estimate.num_blocks == math.ceil(n / points_per_reference_block(n))


def test_subset_of_every_other_point_reproduces_the_exact_mode():
    """Reproduce the exact terms at M = N - 1, blocks of a declared subsample plate included."""
    n, d = 70, 3
    loc, scale, x = table_problem(n, d, rho=0.8)
    model, guide = make_table_model(loc, scale, x)
    pyro.set_rng_seed(1)
    exact = elbo_surgery(model, guide, 16, num_samples=2)  # blocks of 16, the last overlapping
    pyro.set_rng_seed(1)
    subset = elbo_surgery(
        model, guide, 16, num_samples=2, reference_size=n - 1, generator=torch.Generator()
    )
    assert exact.mode == "exact" and subset.mode == "subset" and subset.reference_size == n - 1
    for term in SURGERY_TERMS:
        assert subset.means[term] == pytest.approx(exact.means[term], rel=1e-5, abs=1e-5), term
        assert subset.reference_standard_errors[term] == 0.0, term
        assert subset.standard_errors[term] == pytest.approx(exact.standard_errors[term], 1e-4)


def overlapping_table(n: int = 3000, seed: int = 0):
    """Model and guide over N Gaussian posteriors in D = 10 that overlap (MI of about 3.7)."""
    loc, scale, x = table_problem(n, 10, rho=0.7, scale=1.0, seed=seed)
    return make_table_model(loc, scale, x)


def test_subset_estimate_is_within_three_standard_errors_of_the_exact_value():
    """Land within 3 subset standard errors of the exact value on the same codes, every term."""
    model, guide = overlapping_table(2000)
    pyro.set_rng_seed(2)
    exact = elbo_surgery(model, guide, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    subset = elbo_surgery(
        model, guide, max_plate_nesting=1, reference_size=200, generator=torch.Generator()
    )
    assert exact.means["index_code_mi"] < exact.log_num_points - 2  # overlapping posteriors
    for term in AGGREGATE_TERMS:
        gap = abs(subset.means[term] - exact.means[term])
        assert gap < 3 * subset.reference_standard_errors[term], term
        assert subset.reference_standard_errors[term] < subset.standard_errors[term]
    for term in ("reconstruction", "elbo"):  # no aggregate: the same samples give the same value
        assert subset.means[term] == pytest.approx(exact.means[term], abs=1e-6)
        assert subset.reference_standard_errors[term] == 0.0


def coverage(replicates: int, n: int, m: int) -> dict[str, float]:
    """Fraction of replicates whose 95% subset interval covers the exact value, per term.

    Each replicate draws new codes (the exact value is then recomputed on them) and new subsets.
    """
    covered = dict.fromkeys(AGGREGATE_TERMS, 0)
    model, guide = overlapping_table(n)
    for seed in range(replicates):
        pyro.set_rng_seed(100 + seed)
        exact = elbo_surgery(model, guide, max_plate_nesting=1)
        pyro.set_rng_seed(100 + seed)
        subset = elbo_surgery(
            model,
            guide,
            max_plate_nesting=1,
            reference_size=m,
            generator=torch.Generator().manual_seed(seed),
        )
        for term in AGGREGATE_TERMS:
            gap = abs(subset.means[term] - exact.means[term])
            covered[term] += gap <= 1.96 * subset.reference_standard_errors[term]
    return {term: count / replicates for term, count in covered.items()}


def test_subset_intervals_cover_the_exact_value_fast():
    """Cover the exact value in at least 8 of 10 replicates (N = 600, M = 60).

    At a true coverage of 95%, 7 or fewer of 10 happen with probability 1.2%.
    """
    for term, fraction in coverage(10, 600, 60).items():
        assert fraction >= 0.8, (term, fraction)


@pytest.mark.slow
def test_subset_intervals_cover_the_exact_value():
    """Cover the exact value in 85% to 100% of 40 replicates (N = 3000, M = 300).

    The binomial standard error at 95% coverage over 40 replicates is 3.4 points, so 85% is
    three of them below nominal (probability under 1%).
    """
    for term, fraction in coverage(40, 3000, 300).items():
        assert 0.85 <= fraction <= 1.0, (term, fraction)


# ------------------------------------------------------------------------------- RNG and output
def test_codes_and_global_rng_are_those_of_the_exact_mode():
    """Draw the same codes as the exact mode; with a generator, leave the global RNG as it does."""
    model, guide = make_table_model(*table_problem(200, 3))
    pyro.set_rng_seed(5)
    exact = elbo_surgery(model, guide, max_plate_nesting=1)
    after_exact = torch.rand(3)
    pyro.set_rng_seed(5)
    subset = elbo_surgery(
        model, guide, max_plate_nesting=1, reference_size=50, generator=torch.Generator()
    )
    torch.testing.assert_close(torch.rand(3), after_exact)
    assert subset.means["reconstruction"] == exact.means["reconstruction"]
    pyro.set_rng_seed(5)
    own_draw = elbo_surgery(model, guide, max_plate_nesting=1, reference_size=50)
    assert own_draw.means["elbo"] == exact.means["elbo"]  # one draw for the subsets, after codes


def test_table_and_repr_say_which_mode():
    """Name the mode, M and the number of subsets in the table and the repr."""
    model, guide = make_table_model(*table_problem(300, 2))
    result = elbo_surgery(model, guide, max_plate_nesting=1, reference_size=40)
    text = result.table()
    assert "reference subsets of M = 40 points" in text and "of which subset" in text
    assert f"{result.num_reference_subsets} independent subsets" in text
    assert repr(result).startswith("SurgeryResult(mode='subset', ")
    assert "reference_size=40" in repr(result)
    exact = elbo_surgery(model, guide, max_plate_nesting=1)
    assert "exact (all N points)" in exact.table()
    assert repr(exact).startswith("SurgeryResult(mode='exact', ")


def test_nearly_disjoint_posteriors_warn():
    """Warn that the subset misses what matters when the MI is within a nat of log N."""
    n, d = 500, 4
    loc = 100.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    model, guide = make_table_model(loc, torch.full((n, d), 0.01), loc)
    with pytest.warns(UserWarning, match="within 1 nat of log N"):
        elbo_surgery(model, guide, max_plate_nesting=1, reference_size=50)


# --------------------------------------------------------------------------------------- errors
def test_argument_errors_name_the_argument():
    """Refuse a bad reference_size or generator with a message naming it."""
    n = 30
    loc, scale, x = table_problem(n, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match="reference_size must be at least 2"):
        elbo_surgery(model, guide, reference_size=1)
    with pytest.raises(ValueError, match="reference_size must be at least 2"):
        elbo_surgery(model, guide, reference_size=0)
    with pytest.raises(TypeError, match="reference_size must be an int or None"):
        elbo_surgery(model, guide, reference_size=2.5)
    with pytest.raises(TypeError, match="reference_size must be an int or None"):
        elbo_surgery(model, guide, reference_size=True)
    with pytest.raises(ValueError, match="reference_size=30 exceeds N - 1 = 29"):
        elbo_surgery(model, guide, reference_size=n)
    with pytest.raises(ValueError, match="generator draws the reference subsets"):
        elbo_surgery(model, guide, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        elbo_surgery(model, guide, reference_size=5, generator=3)

    def batch_model(x_batch, idx, n_data):
        with pyro.plate("data", size=n_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x_batch)

    def batch_guide(x_batch, idx, n_data):
        with pyro.plate("data", size=n_data, subsample=idx):
            pyro.sample("z", dist.Normal(loc[idx], scale[idx]).to_event(1))

    options = {"batch_size": 8, "dataset_size": n, "batch_args": lambda i: ((x[i], i, n), {})}
    with pytest.raises(ValueError, match="reference_size=30 exceeds N - 1 = 29"):
        elbo_surgery(batch_model, batch_guide, reference_size=n, **options)
    result = elbo_surgery(batch_model, batch_guide, reference_size=n - 1, **options)
    assert result.mode == "subset" and result.num_points == n


def test_non_normal_code_is_an_error_naming_the_site():
    """Refuse a MultivariateNormal code in subset mode, naming the site and the way out."""
    n, d = 20, 2
    loc, scale, x = table_problem(n, d)
    model, _ = make_table_model(loc, scale, x)

    def guide(batch_size=None):
        with pyro.plate("data", n):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))

    with pytest.raises(ValueError, match="code site\\(s\\) 'z' are not.*reference_size=None"):
        elbo_surgery(model, guide, max_plate_nesting=1, reference_size=5)


def test_underflowing_marginals_take_the_stable_path():
    """Match float64 brute force when a row's shifted reference terms all underflow.

    One reference point is 10^20 times narrower than the rest, so the shift by the columns'
    largest density underflows every term of the rows far from it; at M = N - 1 the estimate is
    exact.
    """
    loc = torch.tensor([[0.0], [0.0], [3.0], [50.0], [51.0]])
    scale = torch.tensor([[1e-20], [1.0], [1.0], [1.0], [1.0]])
    z = torch.tensor([[[0.0], [0.5], [3.5], [50.5], [51.2]]])
    estimate = subset_log_aggregate(z, loc[None], scale[None], 4, torch.Generator())
    pair = torch.distributions.Normal(loc.double(), scale.double()).log_prob(z.double()[:, :, None])
    expected = torch.logsumexp(pair, -2) - math.log(5)  # [1, 5, 1]
    torch.testing.assert_close(estimate.log_marginals.double(), expected, rtol=1e-5, atol=1e-4)
