"""Tests of DecomposedELBO and elbo_surgery with autoguides over the local code.

AutoNormal (full data and minibatches) and AutoDiagonalNormal (full data), read under the user's
site names.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value

from pyro_vi_ext import DecomposedELBO, elbo_surgery

N, D = 32, 2  # N * D and N multiples of 16: torch draws normals in blocks of 16
TERM_NAMES = ("reconstruction", "index_code_mi", "total_correlation", "dimwise_kl", "elbo")


def make_problem(seed: int = 0):
    """Return a model with a real and a positive code per point, and initial guide locations.

    The codes are ``z`` (D dims, real) and ``s`` (positive); the initial locations are spread out
    so that MI and TC are far from zero.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    init = {"z": 1.5 * torch.randn(N, D, generator=gen), "s": torch.rand(N, generator=gen) + 0.5}

    def model(idx=None):
        with pyro.plate("data", N, subsample=idx) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
            pyro.sample("x", dist.Normal(z * s[..., None], 1.0).to_event(1), obs=x[i])

    return model, init


def hand_built_guide(loc_z, scale_z, loc_s, scale_s):
    """Write out the guide an autoguide stands for: the same densities and random numbers."""

    def guide(idx=None):
        with pyro.plate("data", N, subsample=idx) as i:
            pyro.sample("z", dist.Normal(loc_z[i], scale_z[i]).to_event(1))
            pyro.sample("s", dist.LogNormal(loc_s[i], scale_s[i]))

    return guide


def assert_terms_sum_to_the_elbo(terms):
    """Check reconstruction - MI - TC - dim-wise KL = ELBO."""
    parts = (
        terms["reconstruction"]
        - terms["index_code_mi"]
        - terms["total_correlation"]
        - terms["dimwise_kl"]
    )
    assert parts == pytest.approx(terms["elbo"], abs=1e-4)


def data_plate(idx=None):
    """AutoNormal subsamples its parameters through the plates made by ``create_plates``."""
    return pyro.plate("data", N, subsample=idx)


@pytest.mark.parametrize("minibatch", [False, True], ids=["full", "minibatch"])
def test_auto_normal_matches_the_hand_built_guide(minibatch):
    """Match the hand-built guide's loss and terms, and Trace_ELBO at unit weights."""
    model, init = make_problem()
    guide = AutoNormal(
        model, init_loc_fn=init_to_value(values=init), init_scale=0.4, create_plates=data_plate
    )
    kwargs = {"idx": torch.arange(4, 16)} if minibatch else {}
    guide()  # set up its parameters on the full data
    loc_z, scale_z = guide.locs.z.detach(), guide.scales.z.detach()
    loc_s, scale_s = guide.locs.s.detach(), guide.scales.s.detach()
    equivalent = hand_built_guide(loc_z, scale_z, loc_s, scale_s)

    loss = DecomposedELBO(beta=4.0, num_particles=3, max_plate_nesting=1, dataset_size=N)
    pyro.set_rng_seed(3)
    value = loss.loss(model, guide, **kwargs)
    terms = dict(loss.last_terms)
    pyro.set_rng_seed(3)
    expected = loss.loss(model, equivalent, **kwargs)
    assert value == pytest.approx(expected, rel=1e-5)
    assert terms == pytest.approx(loss.last_terms, rel=1e-4, abs=1e-4)
    assert terms["index_code_mi"] > 0.5 and terms["total_correlation"] > 0.01
    assert_terms_sum_to_the_elbo(terms)

    unit = DecomposedELBO(num_particles=3, max_plate_nesting=1, dataset_size=N)
    pyro.set_rng_seed(4)
    ours = unit.loss(model, guide, **kwargs)
    pyro.set_rng_seed(4)
    theirs = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    assert ours == pytest.approx(theirs.loss(model, guide, **kwargs), rel=1e-5)
    assert unit.last_terms["elbo"] == pytest.approx(-ours / N, rel=1e-5)


def test_auto_normal_code_sites_use_the_users_names_and_train():
    """Accept the user's site names as code sites and give finite gradients."""
    model, init = make_problem()
    guide = AutoNormal(
        model, init_loc_fn=init_to_value(values=init), init_scale=0.4, create_plates=data_plate
    )
    guide()
    loss = DecomposedELBO(beta=2.0, code_sites=["z"], max_plate_nesting=1, dataset_size=N)
    value = loss.differentiable_loss(model, guide, idx=torch.arange(10))
    value.backward()
    grads = [p.grad for p in guide.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert_terms_sum_to_the_elbo(loss.last_terms)
    with pytest.raises(ValueError, match="code site 'z_unconstrained' of the guide has no latent"):
        DecomposedELBO(code_sites=["z_unconstrained"], max_plate_nesting=1).loss(model, guide)


def test_auto_diagonal_normal_matches_the_hand_built_guide():
    """Match the hand-built guide's loss and terms with the packed latent."""
    model, init = make_problem()
    guide = AutoDiagonalNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.4)
    guide()
    unpacked = dict((site["name"], value) for site, value in guide._unpack_latent(guide.loc))
    scales = dict((site["name"], value) for site, value in guide._unpack_latent(guide.scale))
    equivalent = hand_built_guide(
        unpacked["z"].detach(), scales["z"].detach(), unpacked["s"].detach(), scales["s"].detach()
    )
    # one particle: the packed latent [z | s] consumes the random numbers in the same order as
    # z then s (torch draws normals in blocks of 16, hence N = 32)
    loss = DecomposedELBO(beta=4.0, gamma=2.0, max_plate_nesting=1, dataset_size=N)
    pyro.set_rng_seed(5)
    value = loss.loss(model, guide)
    terms = dict(loss.last_terms)
    pyro.set_rng_seed(5)
    expected = loss.loss(model, equivalent)
    assert value == pytest.approx(expected, rel=1e-5)
    assert terms == pytest.approx(loss.last_terms, rel=1e-4, abs=1e-4)
    assert_terms_sum_to_the_elbo(terms)


def test_auto_diagonal_normal_set_up_on_a_minibatch_is_a_clear_error():
    """Refuse an AutoDiagonalNormal set up on a minibatch, naming it and the plate.

    Its one latent vector covers the prototype's points: set up on a minibatch, it would pair the
    same parameters with a different random minibatch at every call.
    """
    model, _ = make_problem()
    guide = AutoDiagonalNormal(model)
    with pytest.raises(
        ValueError, match="AutoDiagonalNormal was set up on a minibatch of plate 'data'"
    ):
        DecomposedELBO(max_plate_nesting=1).loss(model, guide, idx=torch.arange(6))


def test_a_point_mass_code_is_named():
    """Refuse a point-mass code site, naming it."""
    model, _ = make_problem()

    def delta_guide(idx=None):
        with pyro.plate("data", N, subsample=idx) as i:
            pyro.sample("z", dist.Delta(torch.zeros(N, D)[i]).to_event(1))
            pyro.sample("s", dist.LogNormal(0.0, 0.5))

    with pytest.raises(ValueError, match="code site 'z' is a point mass"):
        DecomposedELBO(max_plate_nesting=1).loss(model, delta_guide, idx=torch.arange(6))


@pytest.mark.parametrize("batch_size", [None, 8], ids=["all-at-once", "blocks"])
def test_elbo_surgery_reads_an_auto_normal_guide_like_the_hand_built_one(batch_size):
    """Decompose an AutoNormal guide exactly as the hand-built one, at once or in blocks.

    In blocks, the surgery sets the plate's indices: AutoNormal follows them through the plates of
    ``create_plates``.
    """
    model, init = make_problem()
    guide = AutoNormal(
        model, init_loc_fn=init_to_value(values=init), init_scale=0.4, create_plates=data_plate
    )
    guide()
    equivalent = hand_built_guide(
        guide.locs.z.detach(),
        guide.scales.z.detach(),
        guide.locs.s.detach(),
        guide.scales.s.detach(),
    )
    options = {"num_samples": 2, "batch_size": batch_size, "max_plate_nesting": 1}
    pyro.set_rng_seed(6)
    ours = elbo_surgery(model, guide, **options)
    pyro.set_rng_seed(6)
    theirs = elbo_surgery(model, equivalent, **options)
    for name in TERM_NAMES:
        assert ours.means[name] == pytest.approx(theirs.means[name], rel=1e-4, abs=1e-4), name
    assert ours.code_sites == ("z", "s")
    assert ours.means["index_code_mi"] > 0.5
