"""Bad model/guide pairs and bad loss arguments: no silent wrong number, errors that say what to do.

Each refusal test uses the exception's base class (``ValueError``, ``TypeError``, ``MemoryError``)
and a message pattern, so that it runs, and fails, on code without the checks. The acceptance tests
compare against Pyro's own ``Trace_ELBO`` on the same random numbers (one particle: the IW bound is
the ELBO) so that no valid model is refused and the values stay right.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_vi_ext import DecomposedELBO, ImportanceWeightedELBO

N, D = 10, 2


@pytest.fixture
def x() -> torch.Tensor:
    """Ten 2-d observations from a private generator."""
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3))


def local_model(x, size=None, subsample_size=None):
    """``z_n ~ N(0, I_2)``, ``x_n ~ N(z_n, I_2)`` in plate 'data' (optionally subsampled)."""
    with pyro.plate("data", size or x.shape[0], subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx % x.shape[0]])


def local_guide(x, size=None, subsample_size=None):
    """Mean-field guide ``q(z_n) = N(loc, I)`` in the same plate as :func:`local_model`."""
    loc = pyro.param("loc", torch.zeros(D))
    with pyro.plate("data", size or x.shape[0], subsample_size=subsample_size):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


# -- silent wrong numbers -------------------------------------------------------------------------
@pytest.mark.parametrize("validation", [True, False])
def test_misnamed_guide_site_is_refused_naming_both_sites(x, validation):
    """Guide samples 'zz' for the model's 'z': refused with both names, validation on or off."""
    pyro.enable_validation(validation)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("zz", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    with pytest.raises(ValueError, match=r"Model latent site\(s\) 'z' are not sampled.*'zz'"):
        ImportanceWeightedELBO(num_particles=4).loss(local_model, guide, x)


def test_model_latent_forgotten_by_the_guide_is_refused_by_both_loss_families(x):
    """A global 'w' the guide forgot: both loss families refuse and name it."""

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z + w.unsqueeze(-1).unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    pattern = r"Model latent site\(s\) 'w' are not sampled by the guide \(guide sample sites: 'z'\)"
    with pytest.raises(ValueError, match=pattern):
        ImportanceWeightedELBO(num_particles=4).loss(model, guide, x)
    with pytest.raises(ValueError, match=pattern):
        DecomposedELBO(data_plate="data", code_sites="z").loss(model, guide, x)


def test_plate_of_another_full_size_in_the_guide_is_refused(x):
    """Plate 'data' of 32 in the guide and 1000 in the model: refused with both sizes."""

    def guide(x, size=None, subsample_size=None):
        with pyro.plate("data", 32, subsample_size=subsample_size):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    pattern = (
        "Plate 'data' has size 1000 subsampled to 10 in the model but size 32 subsampled to 10"
    )
    for loss in (ImportanceWeightedELBO(num_particles=4), DecomposedELBO(code_sites="z")):
        with pytest.raises(ValueError, match=pattern):
            loss.loss(local_model, guide, x, 1000, N)


def test_plate_of_another_subsample_size_in_the_guide_is_named(x):
    """Subsample sizes 10 (model) and 5 (guide): Pyro's error now names the plate."""

    def guide(x, size=None, subsample_size=None):
        with pyro.plate("data", size, subsample_size=5):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    with pytest.raises(
        ValueError, match="Plate 'data' has subsample size 10 in the model but 5 in the guide"
    ):
        ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1).loss(
            local_model, guide, x, 1000, N
        )


def test_plates_at_swapped_dims_are_refused_even_when_the_sizes_agree():
    """Plates 'a' and 'b' of equal size at swapped dims would silently transpose the guide."""

    def model():
        with pyro.plate("a", 3, dim=-1), pyro.plate("b", 3, dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=torch.zeros(3, 3))

    def guide():
        with pyro.plate("a", 3, dim=-2), pyro.plate("b", 3, dim=-1):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="Plate '[ab]' sits at dim -[12] in the model but at dim"):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=2).loss(model, guide)


def test_plate_left_of_the_particle_plate_is_refused(x):
    """dim=-3 with max_plate_nesting=1: no collision, but particles would mix with plate 'a'."""

    def model(x):
        with pyro.plate("a", 3, dim=-3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="max_plate_nesting=1 is too small.*'a'.*dim -3"):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1).loss(model, model, x)


# -- unclear errors -------------------------------------------------------------------------------
def nested_model(x):
    """Plates 'a' (dim -2) and 'data' (dim -1): two dims of model nesting."""
    with pyro.plate("a", 3, dim=-2), pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def nested_guide(x):
    """Guide for :func:`nested_model` in the same plates."""
    with pyro.plate("a", 3, dim=-2), pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("nesting, num_particles", [(0, 4), (1, 4), (1, 1)])
def test_max_plate_nesting_too_small_names_the_plate_and_the_value(
    x, validation, nesting, num_particles
):
    """A too small nesting names plate 'a' and the value 2; that value then works."""
    pyro.enable_validation(validation)
    loss = ImportanceWeightedELBO(num_particles=num_particles, max_plate_nesting=nesting)
    pattern = (
        rf"max_plate_nesting={nesting} is too small: plate 'a' \(site 'z'\) uses dim -2.*"
        r"Pass max_plate_nesting=2"
    )
    with pytest.raises(ValueError, match=pattern):
        loss.loss(nested_model, nested_guide, x)
    assert math.isfinite(
        ImportanceWeightedELBO(num_particles=num_particles, max_plate_nesting=2).loss(
            nested_model, nested_guide, x
        )
    )


@pytest.mark.parametrize("loss_class", [ImportanceWeightedELBO, DecomposedELBO])
def test_loss_class_passed_to_svi_asks_for_an_instance(x, loss_class):
    """``SVI(..., loss=TheClass)`` calls the class: TypeError asking for an instance."""
    svi = SVI(local_model, local_guide, pyro.optim.Adam({"lr": 0.1}), loss=loss_class)
    name = loss_class.__name__
    with pytest.raises(TypeError, match=rf"Pass an instance: loss={name}\(\.\.\.\)"):
        svi.step(x)


def test_loss_method_called_on_the_class_asks_for_an_instance(x):
    """Unbound ``TheClass.loss(model, guide, x)``: TypeError asking for an instance."""
    for method in ("loss", "loss_and_grads", "differentiable_loss"):
        with pytest.raises(TypeError, match=r"called on the loss class instead of an instance"):
            getattr(ImportanceWeightedELBO, method)(local_model, local_guide, x)


def test_weight_schedules_passed_positionally_are_still_accepted():
    """Two callables first are schedules, not a model and a guide, when they take a step."""
    loss = DecomposedELBO(lambda step: 1.0, lambda step: min(1.0, step / 10), 2.0)
    assert loss.beta(5) == 0.5 and loss.gamma == 2.0


def test_guide_site_of_the_wrong_event_size_names_both_shapes(x):
    """Guide event shape (3,) against the model's (2,): both shapes named."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    pattern = (
        r"Site 'z': the model's distribution has batch shape \(10,\) and event shape \(2,\), "
        r"the guide's has batch shape \(10,\) and event shape \(3,\)\. Size the guide's"
    )
    with pytest.raises(ValueError, match=pattern):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1).loss(local_model, guide, x)


def test_guide_site_with_event_dims_declared_as_batch_dims_says_to_event(x):
    """Same sizes, batch instead of event dims in the guide: the message says to_event(1)."""

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(D), 1.0))

    pattern = (
        r"Site 'z': the model's distribution has batch shape \(1,\) and event shape \(2,\), "
        r"the guide's has batch shape \(2,\) and event shape \(\)\. The sizes match but are "
        r"split differently.*\.to_event\(1\)"
    )
    with pytest.raises(ValueError, match=pattern):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1).loss(model, guide)


def test_guide_event_dims_that_break_the_model_run_are_named_where_they_start(x):
    """A guide event shape (10, 2) breaks the model at 'x'; the error names 'z' and both shapes."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(N, D), 1.0).to_event(2))

    pattern = r"Site 'z': .*event shape \(2,\), the guide's .*event shape \(10, 2\)"
    for loss in (ImportanceWeightedELBO(num_particles=3), DecomposedELBO(code_sites="z")):
        with pytest.raises(ValueError, match=pattern):
            loss.loss(local_model, guide, x)


def test_guide_batch_dims_that_do_not_fit_the_plate_say_to_event(x):
    """Pyro's "shape mismatch inside plate" gets the reason and the fix."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(N, D), 1.0))

    pattern = r"Site 'z': its distribution has a batch dim at dim -1 that does not match the size "
    with pytest.raises(ValueError, match=pattern + r"of plate 'data'.*\.to_event\(n\)"):
        ImportanceWeightedELBO(num_particles=3).loss(local_model, guide, x)


def test_guide_site_outside_the_models_plate_names_the_plates(x):
    """A local latent sampled outside plate 'data' by the guide: both plate lists named."""
    pyro.enable_validation(False)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    pattern = r"Site 'z':.*plates 'data', the guide in plates none: sample 'z' in the guide inside"
    with pytest.raises(ValueError, match=pattern):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1).loss(local_model, guide, x)


@pytest.mark.parametrize("max_plate_nesting", [None, 1])
def test_empty_batch_names_the_plate_and_the_argument(x, max_plate_nesting):
    """An empty batch (plate of size 0) names the plate and the empty argument."""
    loss = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=max_plate_nesting)
    pattern = r"Plate 'data' has no elements: the batch is empty \(positional argument 0 of shape"
    with pytest.raises(ValueError, match=pattern):
        loss.loss(local_model, local_guide, x[:0])


def test_empty_subsample_names_the_plate(x):
    """An empty subsample index tensor names the plate."""

    def model(x):
        with pyro.plate("data", 100, subsample=torch.arange(0)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="Plate 'data' has no elements"):
        ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1).loss(model, model, x)


def test_particles_beyond_the_available_memory_are_refused_before_allocating(x):
    """Four times the free memory in particles: refused before any allocation."""
    from pyro_vi_ext.infer._validation import available_memory_bytes

    limit = available_memory_bytes(torch.device("cpu"))
    if limit is None:
        pytest.skip("no /proc/meminfo on this platform")
    # 480 bytes per particle (see the next test); ask for four times the free memory
    num_particles = 4 * limit // 480
    loss = ImportanceWeightedELBO(num_particles=num_particles, max_plate_nesting=1)
    pattern = rf"{num_particles} vectorized particles need at least .* but only .* is available"
    with pytest.raises(MemoryError, match=pattern):
        loss.loss(local_model, local_guide, x)


def test_particle_memory_estimate_counts_each_site_and_compares_with_the_limit(x):
    """The estimate is two tensors per site per particle; the limit is inclusive."""
    from pyro_vi_ext.infer._validation import ParticleMemoryError, check_particle_memory

    # per particle: guide z, model z and model x, each [N, D] float32, two tensors each
    per_particle = 3 * 2 * N * D * 4
    assert per_particle == 480

    def check(num_particles: int, limit: int) -> None:
        check_particle_memory(
            local_model,
            local_guide,
            (x,),
            {},
            num_particles=num_particles,
            plate_nesting=1,
            available=lambda device: limit,
        )

    check(num_particles=100, limit=100 * per_particle)
    with pytest.raises(ParticleMemoryError, match=r"at most about 99\b"):
        check(num_particles=100, limit=100 * per_particle - 1)


def test_cuda_memory_limit_is_the_free_device_memory(monkeypatch):
    """On CUDA the limit is the free memory reported by ``torch.cuda.mem_get_info``."""
    from pyro_vi_ext.infer._validation import available_memory_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (123_456, 10**9))
    assert available_memory_bytes(torch.device("cuda", 0)) == 123_456
    assert available_memory_bytes(torch.device("meta")) is None


def test_memory_probe_leaves_seeded_draws_and_the_param_store_as_they_were(x):
    """The probe restores the RNG and removes the parameters it created."""
    from pyro_vi_ext.infer._validation import check_particle_memory

    torch.manual_seed(5)
    expected = torch.randn(3)
    torch.manual_seed(5)
    check_particle_memory(local_model, local_guide, (x,), {}, num_particles=8, plate_nesting=1)
    assert torch.equal(torch.randn(3), expected)
    assert "loc" not in pyro.get_param_store()


def test_memory_probe_runs_once_per_model_and_guide(x):
    """The two-particle probe runs once for a model/guide pair, not every step."""
    calls = []

    def guide(x):
        calls.append(1)
        local_guide(x)

    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    for _ in range(3):
        loss.loss(local_model, guide, x)
    assert len(calls) == 3 + 1  # three steps and one two-particle probe


def test_nan_in_the_data_is_still_an_error(x):
    """NaN in observed data stays an error naming the site."""
    x = x.clone()
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="Observed site 'x' contains NaN"):
        ImportanceWeightedELBO(num_particles=3).loss(local_model, local_guide, x)


# -- valid models are not refused, and keep their values ------------------------------------------
def same_seed_values(model, guide, *args, nesting: int = 1) -> tuple[float, float]:
    """IW bound with one particle and Pyro's Trace_ELBO on the same random numbers."""
    pyro.set_rng_seed(11)
    ours = ImportanceWeightedELBO(num_particles=1, max_plate_nesting=nesting).loss(
        model, guide, *args
    )
    pyro.set_rng_seed(11)
    theirs = Trace_ELBO(num_particles=1, max_plate_nesting=nesting).loss(model, guide, *args)
    return ours, theirs


def test_obs_mask_with_the_guide_sampling_the_missing_values(x):
    """obs_mask with the guide sampling 'x_unobserved' matches Trace_ELBO; without it, refused."""
    missing = torch.tensor([False, True] * (N // 2))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0], obs_mask=~missing)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5, 1.0))
            with poutine.mask(mask=missing):
                pyro.sample("x_unobserved", dist.Normal(0.0, 2.0))

    ours, theirs = same_seed_values(model, guide, x)
    assert ours == pytest.approx(theirs, rel=1e-5)
    with pytest.raises(ValueError, match=r"'x_unobserved' are not sampled"):
        same_seed_values(model, local_guide_1d, x)


def local_guide_1d(x):
    """Guide for a scalar 'z' per data point."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5, 1.0))


def test_obs_mask_with_nothing_missing_needs_no_guide_site(x):
    """obs_mask with nothing missing: 'x_unobserved' is masked out and need not be guided."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0], obs_mask=torch.ones(N, dtype=bool))

    ours, theirs = same_seed_values(model, local_guide_1d, x)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_auxiliary_guide_sites_and_deterministic_model_sites_are_accepted(x):
    """AutoNormal's auxiliary sites and a deterministic site: accepted, equal to Trace_ELBO."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.deterministic("z_norm", z.norm(dim=-1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoNormal(model)
    guide(x)  # initialize the parameters outside the compared runs
    ours, theirs = same_seed_values(model, guide, x)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert math.isfinite(ImportanceWeightedELBO(num_particles=5).loss(model, guide, x))


def test_model_side_enumerated_and_fully_masked_sites_are_not_required_in_the_guide():
    """Enumerated and fully masked model latents are exempt from the guide check."""
    from pyro_vi_ext.infer._validation import check_guide_samples_model_latents

    def model():
        pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        with poutine.mask(mask=False):
            pyro.sample("u", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=torch.zeros(3, dtype=bool)):
            pyro.sample("v", dist.Normal(torch.zeros(3), 1.0))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace()
    check_guide_samples_model_latents(model_trace, guide_trace)


def test_schedules_and_subsampled_plates_keep_working(x):
    """A subsampled data plate of the right size in both programs passes every check."""
    loss = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    value = loss.loss(local_model, local_guide, x, 1000, N)
    assert math.isfinite(value)
