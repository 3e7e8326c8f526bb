"""The diagnostics' two particle paths: vectorized and one run per draw agree on the same draws.

The guides below read their standard-normal noise, in order, from a fixed bank
(:class:`BankedNormal`), so the vectorized path (one run of ``S`` particles) and the sequential
path (``S`` runs of one) see exactly the same draws ``z_s``; every diagnostic must then give the
same numbers. ``vectorize_particles="auto"`` is checked on a model that does not broadcast
(``x @ w`` with a global ``w``): it warns once and equals the sequential path on the same draws.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

from pyro_vi_ext.diagnostics import (
    ParticleFallbackWarning,
    importance_resample,
    inference_gaps,
    iw_bound_curve,
    log_evidence,
    psis_diagnostic,
    to_inference_data,
)
from pyro_vi_ext.infer._weights import ParticleVectorizationError

NUM_DRAWS = 24


class NoiseBank:
    """Standard-normal noise handed out row by row: one row per guide draw, in call order."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.used = 0

    def take(self, shape: torch.Size) -> torch.Tensor:
        """Return the next rows, reshaped to ``shape`` (leftmost dim: the draws, if several)."""
        row = math.prod(self.noise.shape[1:])
        count = math.prod(shape) // row
        rows = self.noise[self.used : self.used + count]
        if rows.shape[0] != count:
            raise IndexError(f"the bank holds {self.noise.shape[0]} draws; {self.used} were used")
        self.used += count
        return rows.reshape(shape)


class BankedNormal(dist.TorchDistribution):
    """``Normal(loc, scale)`` whose reparameterized draws take their noise from a bank."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, bank: NoiseBank):
        self.base = dist.Normal(loc, scale)
        self.bank = bank
        super().__init__(self.base.batch_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        """Broadcast loc and scale (Pyro's plates call this)."""
        return BankedNormal(
            self.base.loc.expand(batch_shape), self.base.scale.expand(batch_shape), self.bank
        )

    def rsample(self, sample_shape=()):
        """Return ``loc + scale * noise`` with the bank's next noise rows."""
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.base.loc + self.base.scale * self.bank.take(shape)

    def log_prob(self, value):
        """Log-density of the Normal."""
        return self.base.log_prob(value)


def _bank(rows: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, *shape, generator=torch.Generator().manual_seed(seed))


# -- three broadcasting models: global latent, local latents, model-side enumeration ------------
def regression_model(x, y):
    """Global ``w``, observations in plate "data" (broadcasts: ``(x * w).sum(-1)``)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def regression_guide(bank):
    """Diagonal Normal over ``w`` reading its noise from ``bank``."""

    def guide(x, y):
        loc = torch.tensor([0.8, -1.5, 0.3])
        pyro.sample("w", BankedNormal(loc, torch.full((3,), 0.2), bank).to_event(1))

    return guide


def local_model(x):
    """``z_n ~ N(0, I)``, ``x_n ~ N(z_n, I)`` in plate "data"."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def local_guide(bank):
    """Amortized Normal ``q(z_n | x_n)`` reading its noise from ``bank``."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", BankedNormal(x / 2, torch.full_like(x, 0.8), bank).to_event(1))

    return guide


LOCS, WEIGHTS, NOISE = torch.tensor([-2.0, 0.0, 2.0]), torch.tensor([0.3, 0.3, 0.4]), 0.6


@pyro.infer.config_enumerate
def mixture_model(x):
    """Continuous ``z_n``, enumerated assignment ``c_n``, observed ``x_n``."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Categorical(WEIGHTS))
        pyro.sample("x", dist.Normal(Vindex(LOCS)[..., c] + z, NOISE), obs=x)


def mixture_guide(bank):
    """Return a Normal ``q(z_n)`` reading its noise from ``bank``."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", BankedNormal(torch.zeros_like(x), torch.full_like(x, 0.7), bank))

    return guide


def _data():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(8, generator=generator)
    return {
        "regression": (regression_model, regression_guide, (x, y), (3,)),
        "local": (local_model, local_guide, (torch.randn(6, 2, generator=generator),), (6, 2)),
        "mixture": (mixture_model, mixture_guide, (torch.randn(5, generator=generator),), (5,)),
    }


CASES = _data()


def _run(name: str, diagnostic, vectorize, **options):
    """Run ``diagnostic`` on case ``name`` with a fresh bank (same draws for every call)."""
    model, make_guide, args, shape = CASES[name]
    bank = NoiseBank(_bank(NUM_DRAWS * 4 + 2, *shape))
    pyro.set_rng_seed(0)
    return diagnostic(
        model,
        make_guide(bank),
        *args,
        max_plate_nesting=1,
        vectorize_particles=vectorize,
        **options,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_evidence_psis_and_bound_curve_agree_across_paths(name):
    """Same draws: log-evidence, k-hat and the IW bound curve equal on both paths."""
    results = {}
    for vectorize in (True, False):
        results[vectorize] = (
            _run(name, log_evidence, vectorize, num_samples=NUM_DRAWS, chunk_size=10),
            _run(name, psis_diagnostic, vectorize, num_samples=NUM_DRAWS, chunk_size=10),
            _run(name, iw_bound_curve, vectorize, ks=(1, 4), num_samples=NUM_DRAWS),
        )
    (ev_v, psis_v, curve_v), (ev_s, psis_s, curve_s) = results[True], results[False]
    np.testing.assert_allclose(ev_s.per_point, ev_v.per_point, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ev_s.per_point_se, ev_v.per_point_se, rtol=1e-5, atol=1e-7)
    assert ev_s.point_plates == ev_v.point_plates
    np.testing.assert_allclose(psis_s.log_weights, psis_v.log_weights, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(psis_s.khat, psis_v.khat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curve_s.bound, curve_v.bound, rtol=1e-6, atol=1e-5)
    assert np.isfinite(ev_s.total) and np.isfinite(ev_s.total_se)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_and_resampling_agree_across_paths(name):
    """Same draws: posterior, log-likelihood, sample stats and resampled draws are equal."""
    exports, resampled = {}, {}
    for vectorize in (True, False):
        exports[vectorize] = _run(name, to_inference_data, vectorize, num_samples=NUM_DRAWS)
        resampled[vectorize] = _run(
            name, importance_resample, vectorize, num_samples=10, num_proposals=NUM_DRAWS
        )
    vec, seq = exports[True], exports[False]
    for group in ("posterior", "log_likelihood", "sample_stats", "observed_data"):
        vec_group, seq_group = getattr(vec, group), getattr(seq, group)
        assert set(seq_group.data_vars) == set(vec_group.data_vars), group
        for var in vec_group.data_vars:
            assert seq_group[var].dims == vec_group[var].dims, (group, var)
            np.testing.assert_allclose(
                seq_group[var].values, vec_group[var].values, rtol=1e-5, atol=1e-5
            )
    for var in vec.posterior_predictive.data_vars:  # fresh noise: only the layout is comparable
        assert seq.posterior_predictive[var].shape == vec.posterior_predictive[var].shape
    assert "c" not in vec.posterior  # an enumerated site is summed out, never drawn
    for site, values in resampled[True].samples.items():
        torch.testing.assert_close(resampled[False].samples[site], values)


def test_exported_mixture_log_likelihood_sums_the_assignment_out():
    """log_likelihood of x_n is log sum_c w_c N(x_n | loc_c + z_n, noise), by hand, both paths."""
    x = CASES["mixture"][2][0]
    for vectorize in (True, False):
        idata = _run("mixture", to_inference_data, vectorize, num_samples=NUM_DRAWS)
        z = torch.as_tensor(idata.posterior["z"].values[0], dtype=torch.float64)  # [S, N]
        per_component = WEIGHTS.double().log()[:, None, None] + torch.distributions.Normal(
            LOCS.double()[:, None, None] + z, NOISE
        ).log_prob(x.double())
        expected = torch.logsumexp(per_component, 0)
        np.testing.assert_allclose(idata.log_likelihood["x"].values[0], expected, rtol=1e-5)


# -- a model that does not broadcast -------------------------------------------------------------
def matmul_model(x, y):
    """``x @ w`` with a global ``w``: fails under a particle plate, valid Pyro otherwise."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def test_auto_falls_back_once_and_equals_the_sequential_path():
    """Check "auto": one ParticleFallbackWarning naming the model, then the sequential result.

    The vectorized trial draws 2 particles from the bank before the model fails and the
    sequential trial 2 more, so the sequential reference gets a bank without those 4 rows: both
    see the same draws.
    """
    x, y = CASES["regression"][2]
    noise = _bank(NUM_DRAWS + 6, 3, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = log_evidence(
            matmul_model, regression_guide(NoiseBank(noise)), x, y, num_samples=NUM_DRAWS
        )
    fallbacks = [w for w in caught if issubclass(w.category, ParticleFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert "model failed" in str(fallbacks[0].message)
    assert "vectorize_particles=False" in str(fallbacks[0].message)
    without_trial = torch.cat([noise[:2], noise[6:]])  # prepare's two runs, then the draws
    sequential = log_evidence(
        matmul_model,
        regression_guide(NoiseBank(without_trial)),
        x,
        y,
        num_samples=NUM_DRAWS,
        vectorize_particles=False,
    )
    np.testing.assert_allclose(auto.per_point, sequential.per_point, rtol=1e-6)


@pytest.mark.parametrize(
    "diagnostic, options",
    [
        (log_evidence, {"num_samples": 8}),
        (psis_diagnostic, {"num_samples": 8}),
        (importance_resample, {"num_samples": 4, "num_proposals": 8}),
        (iw_bound_curve, {"ks": (1, 2), "num_samples": 8}),
        (to_inference_data, {"num_samples": 8}),
    ],
    ids=["evidence", "psis", "resample", "curve", "export"],
)
def test_forced_vectorization_names_the_site_and_the_way_out(diagnostic, options):
    """vectorize_particles=True on a non-broadcasting model: the error names place and option."""
    x, y = CASES["regression"][2]
    guide = regression_guide(NoiseBank(_bank(64, 3)))
    with pytest.raises(
        ParticleVectorizationError,
        match=r"(?s)model failed after site '(w|data)'.*vectorize_particles=False",
    ):
        diagnostic(matmul_model, guide, x, y, vectorize_particles=True, **options)


def test_an_unknown_vectorize_value_is_refused():
    """A typo such as "yes" is refused with the allowed values."""
    x, y = CASES["regression"][2]
    with pytest.raises(ValueError, match=r"True, False or 'auto'"):
        log_evidence(regression_model, regression_guide(NoiseBank(_bank(8, 3))), x, y,
                     num_samples=4, vectorize_particles="yes")  # fmt: skip


def test_a_point_mass_guide_is_flagged_on_the_sequential_path():
    """The loop sees every draw: a Delta guide is named as a point mass, a Normal one is not."""
    x, y = CASES["regression"][2]

    def delta_guide(x, y):
        pyro.sample("w", dist.Delta(torch.tensor([0.8, -1.5, 0.3])).to_event(1))

    with pytest.warns(UserWarning, match="site\\(s\\) 'w'"):
        flagged = log_evidence(regression_model, delta_guide, x, y, num_samples=6,
                               max_plate_nesting=1, vectorize_particles=False)  # fmt: skip
    assert flagged.proposal_problem is not None and np.isnan(flagged.total_se)
    spread = _run("regression", log_evidence, False, num_samples=6, chunk_size=10)
    assert spread.proposal_problem is None and np.isfinite(spread.total_se)


def einsum_model(x):
    """Local latents ``z_n`` read by ``einsum("nd,d->n")``: valid Pyro, no particle dim."""
    direction = torch.tensor([1.0, -1.0])
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(torch.einsum("nd,d->n", z, direction), 1.0), obs=x)


def einsum_guide(x):
    """Draw an amortized Normal: the exact posterior's mean with a slightly wrong scale."""
    direction = torch.tensor([1.0, -1.0])
    with pyro.plate("data", x.shape[0]):
        loc = x[:, None] * direction / 3.0
        pyro.sample("z", dist.Normal(loc, torch.full_like(loc, 0.7)).to_event(1))


def test_inference_gaps_fall_back_on_a_model_that_does_not_broadcast():
    """inference_gaps with "auto": one warning, then per-point log p(x_n) = log N(x_n; 0, 3)."""
    x = torch.tensor([-1.5, 0.2, 2.0])
    pyro.set_rng_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gaps = inference_gaps(einsum_model, einsum_guide, x, max_steps=50, check_every=25,
                              num_fit_particles=2, num_evidence_samples=300,
                              num_elbo_samples=20, check_evidence_tail=False)  # fmt: skip
    assert sum(issubclass(w.category, ParticleFallbackWarning) for w in caught) == 1
    exact = torch.distributions.Normal(0.0, math.sqrt(3.0)).log_prob(x).numpy()
    assert np.all(np.abs(gaps.log_evidence - exact) <= 4 * gaps.log_evidence_se + 0.02)
    assert np.all(gaps.amortized_elbo <= gaps.log_evidence + 4 * gaps.amortized_elbo_se)
