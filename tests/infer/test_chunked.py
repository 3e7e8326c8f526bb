"""Exact particle chunking (``particle_chunk_size``) of the bound losses.

The chunked loss draws ``C`` particles at a time, so its random numbers differ from an unchunked
run's under the same seed. Every equality test therefore records the chunked run's guide draws
(the standard-normal noise of each reparameterized site, the values of the other sites and the
subsample indices) and replays them into the *unchunked* loss, whose reparameterized samples are
then ``loc + scale * noise`` with the same graph as a fresh draw. Value, reported terms and the
gradient of every parameter must agree up to float64 rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from pyro_vi_ext import ImportanceWeightedELBO, RenyiAlphaELBO
from pyro_vi_ext.infer import _validation
from pyro_vi_ext.infer._validation import ParticleChunkingError, ParticleMemoryError

N, BATCH, D = 8, 5, 2
F64 = torch.float64


# -- recording and replaying draws -------------------------------------------------------------
def _base(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


def _reparameterized_normal(fn) -> bool:
    return fn.has_rsample and isinstance(_base(fn), torch.distributions.Normal)


class _DrawRecorder(Messenger):
    """Record, per guide call, each site's noise (Normal, reparameterized) or value."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, torch.Tensor]] = []

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"] or isinstance(msg["fn"], dist.Delta):
            return  # an autoguide's Delta site follows from its auxiliary site
        fn, value = msg["fn"], msg["value"]
        if not isinstance(fn, _Subsample) and _reparameterized_normal(fn):
            value = (value - _base(fn).loc) / _base(fn).scale
        self.calls[-1][msg["name"]] = value.detach().clone()

    def drop_replays(self) -> None:
        """Drop each call that repeats the previous one (the guide replayed on its own draws)."""
        kept: list[dict[str, torch.Tensor]] = []
        for call in self.calls:
            if kept and _same_draws(kept[-1], call):
                continue
            kept.append(call)
        self.calls = kept


def _same_draws(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return one.keys() == other.keys() and all(
        one[name].shape == other[name].shape and torch.equal(one[name], other[name]) for name in one
    )


class _DrawInjector(Messenger):
    """Give the guide's sites the recorded draws, one dict per guide call, in order."""

    def __init__(self, calls: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.calls = list(calls)
        self.current: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        recorded = self.current.get(msg["name"])
        if recorded is None or msg["value"] is not None or msg["is_observed"]:
            return
        if isinstance(msg["fn"], dist.Delta):
            return
        fn = msg["fn"]
        if not isinstance(fn, _Subsample) and _reparameterized_normal(fn):
            msg["value"] = _base(fn).loc + _base(fn).scale * recorded  # the graph of rsample
        else:
            msg["value"] = recorded


def recording(guide):
    """Return ``(guide that records its draws, recorder)``."""
    recorder = _DrawRecorder()

    def recorded_guide(*args, **kwargs):
        recorder.calls.append({})
        with recorder:
            return guide(*args, **kwargs)

    return recorded_guide, recorder


def injecting(guide):
    """Return ``(guide, injector)``: successive calls receive ``injector.calls[0]``, ``[1]``, ...

    Once ``injector.calls`` is used up, later calls keep the last dict (a replay of the guide with
    detached parameters, whose values the replay sets anyway); before any, the guide draws as usual.
    """
    injector = _DrawInjector([])

    def injected_guide(*args, **kwargs):
        if injector.calls:
            injector.current = injector.calls.pop(0)
        with injector:
            return guide(*args, **kwargs)

    return injected_guide, injector


def _grads_and_zero() -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in pyro.get_param_store().named_parameters():
        assert param.grad is not None, f"parameter {name} received no gradient"
        grads[name] = param.grad.clone()
        param.grad = None
    return grads


def chunked_against_unchunked(make_loss, chunk_size, model, guide, *args, sequential=False):
    """Run the chunked loss, replay its draws into the unchunked one; compare value and grads."""
    pyro.clear_param_store()
    chunked = make_loss(particle_chunk_size=chunk_size)
    recorded_guide, recorder = recording(guide)
    pyro.set_rng_seed(0)
    chunked.loss(model, recorded_guide, *args)  # creates the parameters; runs the one-time probes
    for param in pyro.get_param_store().values():
        param.unconstrained().grad = None
    recorder.calls.clear()

    pyro.set_rng_seed(1)
    value = chunked.loss_and_grads(model, recorded_guide, *args)
    grads = _grads_and_zero()
    terms = dict(chunked.last_terms)
    recorder.drop_replays()
    total = chunked.num_outer * chunked.num_particles
    chunks = -(-total // chunk_size) if chunk_size < total else 0
    calls_per_pass = total if sequential else chunks
    if chunks:
        assert len(recorder.calls) == 2 * calls_per_pass
        first, second = recorder.calls[:calls_per_pass], recorder.calls[calls_per_pass:]
        for one, other in zip(first, second, strict=True):  # pass 2 replays pass 1 exactly
            assert one.keys() == other.keys()
            for name in one:
                assert torch.equal(one[name], other[name]), name
        calls = second
    else:
        assert len(recorder.calls) == (total if sequential else 1)
        calls = recorder.calls
    if not sequential and len(calls) > 1:
        merged = {}
        for name, draw in calls[0].items():
            if draw.dtype == torch.int64:  # subsample indices: the same in every chunk
                assert all(torch.equal(call[name], draw) for call in calls)
                merged[name] = draw
            else:
                merged[name] = torch.cat([call[name] for call in calls], 0)
        calls = [merged]

    reference = make_loss(particle_chunk_size=None)
    injected_guide, injector = injecting(guide)
    reference.loss_and_grads(model, injected_guide, *args)  # its one-time probes, fresh draws
    _grads_and_zero()
    injector.calls = list(calls)
    expected = reference.loss_and_grads(model, injected_guide, *args)
    assert not injector.calls  # every recorded call was replayed, in order
    expected_grads = _grads_and_zero()
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert terms == pytest.approx(reference.last_terms, rel=1e-10, abs=1e-10)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-11, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())
    return grads


# -- models (float64 throughout) -------------------------------------------------------------
def local_data() -> torch.Tensor:
    """Return ``[N, D]`` observations from a private generator."""
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=F64) * 1.5


def local_model(x, batch_size=BATCH):
    """``z_n ~ N(0, I)``, ``x_n ~ N(w z_n, I)`` in a subsampled data plate."""
    weight = pyro.param("decoder", torch.full((D,), 0.8, dtype=F64))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(weight * z, 1.0).to_event(1), obs=x[idx])


def local_guide(x, batch_size=BATCH):
    """Amortized ``q(z_n | x_n) = N(a x_n + b, s^2)`` (the particle count is irrelevant)."""
    a = pyro.param("a", torch.full((D,), 0.3, dtype=F64))
    b = pyro.param("b", torch.full((D,), -0.2, dtype=F64))
    s = pyro.param("s", torch.full((D,), 0.9, dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("z", dist.Normal(a * x[idx] + b, s).to_event(1))


def hierarchical_model(x):
    """Global ``g ~ N(0, 1)``, local ``z_n ~ N(g, 1)``, ``x_n ~ N(z_n, 1)``; full data plate."""
    shift = pyro.param("shift", torch.tensor(0.1, dtype=F64))
    g = pyro.sample("g", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", x.shape[0]):
        loc = (g.unsqueeze(-1) + shift) * torch.ones(D, dtype=F64)
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def hierarchical_guide(x):
    """Mean-field guide: ``q(g)`` Normal, ``q(z_n | x_n)`` amortized Normal."""
    g_loc = pyro.param("g_loc", torch.tensor(0.4, dtype=F64))
    g_scale = pyro.param("g_scale", torch.tensor(0.7, dtype=F64), constraint=constraints.positive)
    pyro.sample("g", dist.Normal(g_loc, g_scale))
    a = pyro.param("a", torch.full((D,), 0.5, dtype=F64))
    s = pyro.param("s", torch.full((D,), 0.8, dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, s).to_event(1))


def global_model(x, batch_size=BATCH):
    """Global ``g ~ N(0, 1)`` and ``x_n ~ N(g, 1)`` in a subsampled data plate."""
    g = pyro.sample("g", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("x", dist.Normal(g, 1.0), obs=x[idx, 0])


class _NonReparamNormal(dist.Normal):
    """A Normal without ``rsample``: the loss must use a score-function term."""

    has_rsample = False


def score_guide(x, batch_size=BATCH):
    """``q(z_n | x_n)`` without rsample (score-function gradients)."""
    a = pyro.param("a", torch.full((D,), 0.3, dtype=F64))
    s = pyro.param("s", torch.full((D,), 0.9, dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("z", _NonReparamNormal(a * x[idx], s).to_event(1))


# -- equality with the unchunked loss on the same draws ---------------------------------------
@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("chunk_size", [1, 2, 4, 6, 10], ids=lambda c: f"C{c}")
def test_iwae_chunks_match_unchunked(estimator, chunk_size):
    """Check: K=6 under subsampling, C dividing K (1, 2), not dividing (4), C = K and C > K."""

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=6,
            estimator=estimator,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    chunked_against_unchunked(make_loss, chunk_size, local_model, local_guide, local_data())


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("variant", ["iwae", "ciwae"])
def test_miwae_and_ciwae_chunks_match(estimator, variant):
    """Check: M=3 bounds of K=4 in chunks of 5, which straddle the bounds."""

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=4,
            num_outer=3,
            variant=variant,
            ciwae_beta=0.3,
            estimator=estimator,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    chunked_against_unchunked(make_loss, 5, local_model, local_guide, local_data())


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_renyi_chunks_match(estimator, alpha):
    """Check: the Renyi bound's tilted weights and DReG path weights, K=5 in chunks of 2."""

    def make_loss(particle_chunk_size):
        return RenyiAlphaELBO(
            num_particles=5,
            alpha=alpha,
            estimator=estimator,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    chunked_against_unchunked(make_loss, 2, local_model, local_guide, local_data())


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_global_and_local_latents_match(estimator):
    """Check: a global latent (whole-trace bound) with a local one, K=5 in chunks of 2."""

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=5,
            estimator=estimator,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    grads = chunked_against_unchunked(
        make_loss, 2, hierarchical_model, hierarchical_guide, local_data()
    )
    assert {"g_loc", "g_scale", "shift"} <= grads.keys()


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_autonormal_guide_matches(estimator):
    """Check: an AutoNormal guide (auxiliary Normal sites, Delta sites), K=5 in chunks of 2."""
    from pyro.infer.autoguide import AutoNormal

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=5,
            estimator=estimator,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    pyro.clear_param_store()
    guide = AutoNormal(hierarchical_model, init_scale=0.5)
    grads = chunked_against_unchunked(make_loss, 2, hierarchical_model, guide, local_data())
    assert any(name.startswith("AutoNormal.locs") for name in grads)


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_global_latent_under_subsampling_with_one_particle_per_bound(estimator):
    """Check: K=1, M=4 (an ELBO, allowed under subsampling) in chunks of 3."""

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=1,
            num_outer=4,
            estimator=estimator,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    def guide(x, batch_size=BATCH):
        loc = pyro.param("g_loc", torch.tensor(0.4, dtype=F64))
        scale = pyro.param("g_scale", torch.tensor(0.7, dtype=F64), constraint=constraints.positive)
        pyro.sample("g", dist.Normal(loc, scale))
        # the guide draws the minibatch (recorded, replayed by the model)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size):
            pass

    chunked_against_unchunked(make_loss, 3, global_model, guide, local_data())


@pytest.mark.parametrize(
    "num_particles, num_outer", [(5, 1), (3, 2), (1, 4)], ids=["K5", "K3-M2", "K1-M4"]
)
def test_score_function_sites_match(num_particles, num_outer):
    """Check: leave-one-out signals from the full log-weights (K > 1) and the K=1 ELBO terms."""

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=num_particles,
            num_outer=num_outer,
            max_plate_nesting=1,
            particle_chunk_size=particle_chunk_size,
        )

    grads = chunked_against_unchunked(make_loss, 2, local_model, score_guide, local_data())
    assert grads["a"].abs().sum() > 0 and grads["s"].abs().sum() > 0


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_sequential_particles_match(estimator):
    """Check: vectorize_particles=False, K=4 in chunks of 3 (one minibatch for all particles)."""

    def make_loss(particle_chunk_size):
        return ImportanceWeightedELBO(
            num_particles=4,
            estimator=estimator,
            max_plate_nesting=1,
            vectorize_particles=False,
            particle_chunk_size=particle_chunk_size,
        )

    chunked_against_unchunked(make_loss, 3, local_model, local_guide, local_data(), sequential=True)


# -- the random stream and the minibatch -----------------------------------------------------
def test_loss_equals_loss_and_grads_and_second_pass_leaves_the_stream():
    """Check: same seed, same value; the stream ends where ``loss`` (pass 1 only) leaves it."""
    x = local_data()
    loss = ImportanceWeightedELBO(num_particles=7, estimator="dreg", particle_chunk_size=3)
    pyro.clear_param_store()
    loss.loss(local_model, local_guide, x)
    pyro.set_rng_seed(5)
    value = loss.loss(local_model, local_guide, x)
    after_loss = torch.rand(3)
    pyro.set_rng_seed(5)
    returned = loss.loss_and_grads(local_model, local_guide, x)
    after_grads = torch.rand(3)
    assert returned == value
    assert torch.equal(after_loss, after_grads)


def test_every_chunk_sees_the_first_chunks_minibatch():
    """Check: the data plate's subsample indices are drawn once per step, not per chunk."""
    seen = []

    def model(x, batch_size=BATCH):
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            seen.append(idx.clone())
            pyro.sample("z", dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1), obs=x[idx])

    def guide(x, batch_size=BATCH):
        pyro.param("unused", torch.zeros(()))
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            seen.append(idx.clone())
            pyro.sample("z", dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1))

    loss = ImportanceWeightedELBO(num_particles=9, max_plate_nesting=1, particle_chunk_size=2)
    pyro.set_rng_seed(0)
    loss.loss(model, guide, local_data())
    seen.clear()
    loss.loss(model, guide, local_data())
    assert len(seen) == 10  # 5 chunks, guide and model
    assert all(torch.equal(idx, seen[0]) for idx in seen)


# -- refusals and argument checks ------------------------------------------------------------
def test_differentiable_loss_is_refused_while_chunks_split_the_particles():
    """Check: the error names the option and the alternatives; ELBOModule refuses too."""
    x = local_data()
    loss = ImportanceWeightedELBO(num_particles=4, particle_chunk_size=2, max_plate_nesting=1)
    with pytest.raises(ParticleChunkingError, match=r"particle_chunk_size=2.*loss_and_grads"):
        loss.differentiable_loss(local_model, local_guide, x)
    with pytest.raises(ParticleChunkingError, match="particle_chunk_size=None"):
        loss(local_model, local_guide)(x)


def test_chunk_at_least_all_particles_is_the_unchunked_loss():
    """Check: C >= M K keeps differentiable_loss, with the unchunked value on the same seed."""
    x = local_data()
    pyro.clear_param_store()
    whole = ImportanceWeightedELBO(num_particles=4, num_outer=2, particle_chunk_size=8)
    plain = ImportanceWeightedELBO(num_particles=4, num_outer=2)
    pyro.set_rng_seed(2)
    value = whole.differentiable_loss(local_model, local_guide, x)
    pyro.set_rng_seed(2)
    assert value.item() == plain.differentiable_loss(local_model, local_guide, x).item()
    assert value.requires_grad


def test_piwae_and_jit_are_refused():
    """Check: PIWAE and jit=True name the option and what to use instead."""
    with pytest.raises(ParticleChunkingError, match="piwae.*particle_chunk_size=None"):
        ImportanceWeightedELBO(num_particles=4, num_outer=2, variant="piwae", particle_chunk_size=2)
    with pytest.raises(ParticleChunkingError, match="jit=True"):
        ImportanceWeightedELBO(num_particles=4, jit=True, particle_chunk_size=2)
    with pytest.raises(ParticleChunkingError, match="jit=True"):
        RenyiAlphaELBO(num_particles=4, jit=True, particle_chunk_size=2)
    with pytest.raises(ParticleChunkingError, match="jit='inductor'"):
        ImportanceWeightedELBO(num_particles=4, jit="inductor", particle_chunk_size=2)


def test_piwae_changed_after_construction_is_refused_at_the_call():
    """Check: the refusal is also checked when the loss runs."""
    loss = ImportanceWeightedELBO(num_particles=4, num_outer=2, particle_chunk_size=2)
    loss.variant = "piwae"
    with pytest.raises(ParticleChunkingError, match="piwae"):
        loss.loss_and_grads(local_model, local_guide, local_data())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_invalid_chunk_sizes(bad):
    """Check: anything but None or a positive int is refused, naming the argument."""
    with pytest.raises(ValueError, match="particle_chunk_size must be None .* positive int"):
        ImportanceWeightedELBO(num_particles=4, particle_chunk_size=bad)
    with pytest.raises(ValueError, match="particle_chunk_size"):
        RenyiAlphaELBO(num_particles=4, particle_chunk_size=bad)


def test_replay_that_does_not_reproduce_the_draws_is_an_error():
    """Check: randomness from a private generator breaks the replay, and the loss says so."""
    generator = torch.Generator().manual_seed(0)

    def guide(x, batch_size=BATCH):
        a = pyro.param("a", torch.full((D,), 0.3, dtype=F64))
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            jitter = torch.randn(D, generator=generator, dtype=F64)
            pyro.sample("z", dist.Normal(a * x[idx] + jitter, 1.0).to_event(1))

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1, particle_chunk_size=2)
    with pytest.raises(ParticleChunkingError, match="did not reproduce"):
        loss.loss_and_grads(local_model, guide, local_data())


# -- memory ------------------------------------------------------------------------------------
def test_memory_check_uses_the_chunk_size(monkeypatch):
    """Check: the memory estimate is made for C particles, and says the loss can chunk."""
    calls = []

    def record(*args, num_particles, chunkable, **kwargs):
        calls.append((num_particles, chunkable))

    monkeypatch.setattr(_validation, "check_particle_memory", record)
    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=1000, max_plate_nesting=1, particle_chunk_size=50)
    loss._check_memory_once = None  # no effect: the check is a module function
    _validation._check_memory_once(loss, local_model, local_guide, (local_data(),), {})
    unchunked = ImportanceWeightedELBO(num_particles=1000, max_plate_nesting=1)
    _validation._check_memory_once(unchunked, local_model, local_guide, (local_data(),), {})
    assert calls == [(50, True), (1000, True)]


def test_memory_error_suggests_chunking():
    """Check: a run that cannot fit names particle_chunk_size with a size that fits."""

    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(1000), 1.0).to_event(1))

    with pytest.raises(ParticleMemoryError, match=r"particle_chunk_size=\d+ or less"):
        _validation.check_particle_memory(
            guide,
            guide,
            (),
            {},
            num_particles=10**6,
            plate_nesting=0,
            available=lambda device: 10**6,
            chunkable=True,
        )


# -- the training runner -------------------------------------------------------------------------
def test_fit_trains_with_a_chunked_loss():
    """Check: fit calls loss_and_grads, so a chunked loss trains (losses finite, params move)."""
    from pyro_vi_ext import fit

    def model(x, *, idx=None, n_data=None):
        weight = pyro.param("decoder", torch.full((D,), 0.8, dtype=F64))
        with pyro.plate("data", n_data or x.shape[0], subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(weight * z, 1.0).to_event(1), obs=x)

    def guide(x, *, idx=None, n_data=None):
        a = pyro.param("a", torch.full((D,), 0.3, dtype=F64))
        s = pyro.param("s", torch.full((D,), 0.9, dtype=F64), constraint=constraints.positive)
        with pyro.plate("data", n_data or x.shape[0], subsample=idx):
            pyro.sample("z", dist.Normal(a * x, s).to_event(1))

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=6, estimator="dreg", particle_chunk_size=4)
    result = fit(
        model, guide, local_data(), loss, pyro.optim.Adam({"lr": 0.05}),
        num_steps=4, batch_size=4, progress=False,
    )  # fmt: skip
    assert result.num_steps == 4
    assert np.isfinite(result.history["loss"]).all()
    assert not torch.allclose(result.params["a"], torch.full((D,), 0.3, dtype=F64))


# -- parameters created by the first pass, module state, dropout -------------------------------
def _lazy_guide(x, batch_size=BATCH):
    """``q(z_n)`` whose location is initialized at random on first use (a lazy ``pyro.param``)."""
    loc = pyro.param("lazy_loc", lambda: torch.randn(x.shape[0], D, dtype=F64))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("z", dist.Normal(loc[idx], 1.0).to_event(1))


def test_random_lazy_parameter_initialization_is_chunked_on_the_first_step():
    """Check: a random ``pyro.param`` initializer in pass 1 does not shift pass 2's draws."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = ImportanceWeightedELBO(num_particles=6, max_plate_nesting=1, particle_chunk_size=2)
    value = loss.loss_and_grads(local_model, _lazy_guide, local_data())
    grad = pyro.param("lazy_loc").unconstrained().grad
    assert np.isfinite(value)
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool((grad != 0).any())


def test_foreign_randomness_is_still_refused_after_a_lazy_initialization():
    """Check: the rerun of pass 1 does not hide randomness from a private generator."""
    private = torch.Generator().manual_seed(1)

    def guide(x, batch_size=BATCH):
        loc = pyro.param("lazy_loc", lambda: torch.randn(x.shape[0], D, dtype=F64))
        noise = torch.randn(D, generator=private, dtype=F64)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            pyro.sample("z", dist.Normal(loc[idx] + noise, 1.0).to_event(1))

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=6, max_plate_nesting=1, particle_chunk_size=2)
    with pytest.raises(ParticleChunkingError, match="did not reproduce"):
        loss.loss_and_grads(local_model, guide, local_data())


def _normed_guide(encoder):
    def guide(x, batch_size=BATCH):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            h = encoder(x[idx])
            pyro.sample("z", dist.Normal(h[:, :D], h[:, D:].exp()).to_event(1))

    return guide


def test_first_pass_leaves_running_statistics_and_the_warning_names_the_module():
    """Check: BatchNorm is updated ceil(S / C) times per step (pass 2 only), warned about once."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.BatchNorm1d(2 * D)).double()
    guide = _normed_guide(encoder)
    norm = encoder[1]
    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=7, max_plate_nesting=1, particle_chunk_size=3)
    with pytest.warns(UserWarning, match="BatchNorm1d .* once per chunk"):
        loss.loss_and_grads(local_model, guide, local_data())
    before, mean = int(norm.num_batches_tracked), norm.running_mean.clone()
    loss.loss(local_model, guide, local_data())  # pass 1 only: no module state changes
    assert int(norm.num_batches_tracked) == before
    assert torch.equal(norm.running_mean, mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per loss: no second warning
        loss.loss_and_grads(local_model, guide, local_data())
    assert int(norm.num_batches_tracked) == before + 3  # ceil(7 / 3) chunks in pass 2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dropout_in_training_mode_is_warned_about(training):
    """Check: a Dropout module in training mode under a chunked loss warns; in eval mode not."""
    encoder = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.Dropout(0.2)).double()
    encoder.train(training)
    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1, particle_chunk_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.loss_and_grads(local_model, _normed_guide(encoder), local_data())
    messages = [str(w.message) for w in caught if "Dropout" in str(w.message)]
    assert len(messages) == (1 if training else 0)
    if training:
        assert "one mask per chunk" in messages[0]


class _Counter(torch.nn.Module):
    """Adds a small multiple of its call count (a buffer) to its input: forward-visible state."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return h + 0.01 * self.calls


def test_rerun_of_the_first_pass_starts_from_the_restored_module_state():
    """Check: lazy parameters and a stateful module: pass 2 replays what pass 1's rerun saw."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), _Counter()).double()
    guide = _normed_guide(encoder)

    def lazy_guide(x, batch_size=BATCH):
        pyro.param("lazy_loc", lambda: torch.randn(D, dtype=F64))
        guide(x, batch_size)

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=6, max_plate_nesting=1, particle_chunk_size=2)
    with pytest.warns(UserWarning, match="_Counter"):
        value = loss.loss_and_grads(local_model, lazy_guide, local_data())
    assert np.isfinite(value)
