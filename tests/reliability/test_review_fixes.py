"""Regression tests for defects found by the red-team review."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from pyro_vi_ext import ClosedFormELBO

NOISE_SD = 0.5
GUIDE_LOC, GUIDE_SCALE = 1.7, 0.3


def _regression_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, generator=generator)
    y = 2 * x + NOISE_SD * torch.randn(40, generator=generator)
    return x, y


def _regression_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(w * x, NOISE_SD), obs=y)


def _exact_elbo(x, y):
    """Closed-form ELBO of ``_regression_model`` under q(w) = N(GUIDE_LOC, GUIDE_SCALE)."""
    m, s = GUIDE_LOC, GUIDE_SCALE
    expected_sq = ((y - m * x) ** 2 + (s * x) ** 2).sum()
    log_lik = -0.5 * len(x) * math.log(2 * math.pi * NOISE_SD**2) - expected_sq / (2 * NOISE_SD**2)
    kl = math.log(1 / s) + (s**2 + m**2) / 2 - 0.5
    return float(log_lik) - kl


def _auto_normal():
    return AutoNormal(
        _regression_model,
        init_loc_fn=init_to_value(values={"w": torch.tensor(GUIDE_LOC)}),
        init_scale=GUIDE_SCALE,
    )


@pytest.mark.parametrize("form", ["kl", "entropy"])
def test_closed_form_with_auto_normal_matches_exact_elbo(form):
    x, y = _regression_data()
    exact = _exact_elbo(x, y)
    estimates = []
    for seed in range(8):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        loss = ClosedFormELBO(form=form, num_particles=500).loss(
            _regression_model, _auto_normal(), x, y
        )
        estimates.append(-loss)
    estimates = torch.tensor(estimates)
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - exact) < 4 * standard_error + 1e-3


def test_closed_form_with_auto_normal_matches_trace_elbo_gradient_in_expectation():
    x, y = _regression_data()
    grads = {}
    for name, loss_fn in [
        ("closed", ClosedFormELBO(form="kl", num_particles=4000)),
        ("trace", Trace_ELBO(num_particles=4000, vectorize_particles=True)),
    ]:
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = _auto_normal()
        loss_fn.differentiable_loss(_regression_model, guide, x, y).backward()
        grads[name] = guide.locs.w.grad.clone()
    # d ELBO / d loc is linear in w, exact gradient of -ELBO: (m * sum x^2 - sum xy) / sd^2 + m.
    exact = float((GUIDE_LOC * (x**2).sum() - (x * y).sum()) / NOISE_SD**2 + GUIDE_LOC)
    assert float(grads["closed"]) == pytest.approx(exact, abs=0.05 * abs(exact))
    assert float(grads["trace"]) == pytest.approx(exact, abs=0.05 * abs(exact))


def _positive_model(x, y=None):
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def test_closed_form_kl_refuses_transformed_auto_normal_site_by_name():
    x, y = _regression_data()
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"'sigma'.*form='entropy'"):
        ClosedFormELBO(form="kl").loss(_positive_model, AutoNormal(_positive_model), x, y)


def test_closed_form_entropy_with_transformed_auto_normal_site_matches_trace_elbo():
    x, y = _regression_data()
    values = {}
    for name, loss_fn in [
        ("closed", ClosedFormELBO(form="entropy", num_particles=20000)),
        ("trace", Trace_ELBO(num_particles=20000, vectorize_particles=True)),
    ]:
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        values[name] = loss_fn.loss(_positive_model, AutoNormal(_positive_model), x, y)
    assert values["closed"] == pytest.approx(values["trace"], abs=0.5)


def test_closed_form_with_auto_diagonal_normal():
    x, y = _regression_data()
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(_regression_model)
    with pytest.raises(ValueError, match=r"'w'.*joint auxiliary.*form='entropy'"):
        ClosedFormELBO(form="kl").loss(_regression_model, guide, x, y)
    values = {}
    for name, loss_fn in [
        ("closed", ClosedFormELBO(form="entropy", num_particles=20000)),
        ("trace", Trace_ELBO(num_particles=20000, vectorize_particles=True)),
    ]:
        pyro.set_rng_seed(3)
        values[name] = loss_fn.loss(_regression_model, guide, x, y)
    assert values["closed"] == pytest.approx(values["trace"], abs=1.0)


SUBSAMPLE_DATA = torch.randn(100, generator=torch.Generator().manual_seed(4)) + 1.0


def _subsampled_model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", 100, subsample_size=10) as index:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[index])


def _subsampled_guide(data):
    pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.5)), 0.3))


def test_closed_form_one_particle_allows_global_latent_under_subsampling():
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    loss = ClosedFormELBO(form="kl", max_plate_nesting=1).differentiable_loss(
        _subsampled_model, _subsampled_guide, SUBSAMPLE_DATA
    )
    loss.backward()
    closed_grad = float(pyro.param("loc").unconstrained().grad)

    pyro.clear_param_store()
    pyro.set_rng_seed(5)  # the same random numbers, by hand: guide, then the model's subsample
    guide_trace = pyro.poutine.trace(_subsampled_guide).get_trace(SUBSAMPLE_DATA)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(_subsampled_model, guide_trace)).get_trace(
        SUBSAMPLE_DATA
    )
    mu = guide_trace.nodes["mu"]["value"]
    index = model_trace.nodes["data"]["value"]
    loc = pyro.param("loc").unconstrained()
    kl = torch.log(torch.tensor(10.0 / 0.3)) + (0.3**2 + loc**2) / (2 * 100.0) - 0.5
    expected = -(10.0 * dist.Normal(mu, 1.0).log_prob(SUBSAMPLE_DATA[index]).sum() - kl)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert closed_grad == pytest.approx(float(loc.grad), rel=1e-5)


def test_closed_form_sequential_particles_match_hand_written_loop():
    x, y = _regression_data()
    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    loss_fn = ClosedFormELBO(
        form="kl", num_particles=3, max_plate_nesting=1, vectorize_particles=False
    )
    loss = loss_fn.loss(_regression_model, _auto_normal(), x, y)

    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    guide = _auto_normal()
    log_liks = []
    for _ in range(3):
        guide_trace = pyro.poutine.trace(guide).get_trace(x, y)
        w = guide_trace.nodes["w"]["value"].detach()
        log_liks.append(float(dist.Normal(w * x, NOISE_SD).log_prob(y).sum()))
    s = GUIDE_SCALE
    kl = math.log(1 / s) + (s**2 + GUIDE_LOC**2) / 2 - 0.5
    assert loss == pytest.approx(-(sum(log_liks) / 3 - kl), rel=1e-5)


def _random_init_guide(x, y=None):
    loc = pyro.param("guide_loc", lambda: torch.randn(()))
    pyro.sample("w", dist.Normal(loc, 0.3))


@pytest.mark.parametrize("loss_class", ["ImportanceWeightedELBO", "ClosedFormELBO"])
def test_plate_nesting_guess_leaves_seeded_results_unchanged(loss_class):
    import pyro_vi_ext

    x, y = _regression_data()
    for seed in range(3):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        reference = Trace_ELBO().loss(_regression_model, _random_init_guide, x, y)
        reference_loc = float(pyro.param("guide_loc").detach())
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        kwargs = {"form": "entropy"} if loss_class == "ClosedFormELBO" else {}
        loss_fn = getattr(pyro_vi_ext, loss_class)(**kwargs)
        first = loss_fn.loss(_regression_model, _random_init_guide, x, y)
        if loss_class == "ClosedFormELBO":  # its entropy term replaces -log q(w): put it back
            w_dist = dist.Normal(pyro.param("guide_loc"), 0.3)
            pyro.set_rng_seed(seed)
            torch.randn(())  # the parameter's initialization
            w = w_dist.sample()
            first = first + float(w_dist.entropy() + w_dist.log_prob(w))
        assert float(pyro.param("guide_loc").detach()) == reference_loc
        assert first == pytest.approx(reference, rel=1e-5)


def _global_weights_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def _global_weights_guide(x, y=None):
    pyro.sample("w", dist.Normal(pyro.param("l", torch.zeros(3)), 1.0).to_event(1))


@pytest.mark.parametrize(
    ("loss_class", "kwargs", "term"),
    [
        ("ImportanceWeightedELBO", {"num_particles": 10}, "iw_bound"),
        ("RenyiAlphaELBO", {"num_particles": 5, "alpha": 0.5}, "renyi_bound"),
        ("ClosedFormELBO", {}, "elbo"),
        ("ClosedFormELBO", {"num_particles": 4}, "elbo"),
    ],
)
def test_reported_terms_are_per_data_point_with_global_latents(loss_class, kwargs, term):
    import pyro_vi_ext

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(60, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(60, generator=generator)
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    loss_fn = getattr(pyro_vi_ext, loss_class)(max_plate_nesting=1, **kwargs)
    loss = loss_fn.loss(_global_weights_model, _global_weights_guide, x, y)
    assert loss_fn.last_terms[term] == pytest.approx(-loss / 60, rel=1e-5)
    assert abs(loss_fn.last_terms["elbo"]) < abs(loss) / 5  # per point, not the total


def _indexing_model(data):
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    assignment = (data > 0).long()
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def _indexing_guide(data):
    with pyro.plate("components", 2):
        pyro.sample("locs", dist.Normal(pyro.param("locs_loc", torch.zeros(2)), 1.0))


def _broken_model(data):
    with pyro.plate("components", 2):
        pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(torch.zeros(3), 1.0), obs=data)


def test_plate_shape_error_of_a_broadcasting_failure_names_the_particle_plate():
    from pyro_vi_ext import ImportanceWeightedELBO
    from pyro_vi_ext.infer._weights import ParticleVectorizationError

    data = torch.linspace(-2.0, 2.0, 10)
    pyro.clear_param_store()
    loss_fn = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    with pytest.raises(
        ParticleVectorizationError, match=r"(?s)site obs.*vectorize_particles=False"
    ):
        loss_fn.loss(_indexing_model, _indexing_guide, data)
    assert set(pyro.get_param_store().keys()) == {"locs_loc"}
    sequential = ImportanceWeightedELBO(
        num_particles=4, max_plate_nesting=1, vectorize_particles=False
    )
    assert math.isfinite(sequential.loss(_indexing_model, _indexing_guide, data))


def test_shape_error_that_also_fails_without_particle_plate_is_not_blamed_on_it():
    from pyro_vi_ext import ImportanceWeightedELBO
    from pyro_vi_ext.infer._weights import ParticleVectorizationError

    data = torch.linspace(-2.0, 2.0, 10)
    pyro.clear_param_store()
    loss_fn = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    with pytest.raises(ValueError) as raised:
        loss_fn.loss(_broken_model, _indexing_guide, data)
    assert not isinstance(raised.value, ParticleVectorizationError)


def _tiny_fit(tmp_path, **kwargs):
    from pyro_vi_ext import fit

    data = torch.randn(8, generator=torch.Generator().manual_seed(8))

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)

    pyro.clear_param_store()
    return fit(
        model,
        AutoNormal(model),
        (data,),
        Trace_ELBO(),
        pyro.optim.Adam({"lr": 0.01}),
        data_plate="data",
        num_steps=2,
        progress=False,
        **kwargs,
    )


def test_checkpoint_arguments_of_the_wrong_type_are_named(tmp_path):
    from pyro_vi_ext.training.checkpoint import load_checkpoint

    with pytest.raises(TypeError, match=r"`checkpoint` must be a file path.*int 123"):
        _tiny_fit(tmp_path, checkpoint=123)
    with pytest.raises(TypeError, match=r"`path` must be a file path.*int 5"):
        load_checkpoint(5)


def test_fit_refuses_to_overwrite_a_file_that_is_not_a_checkpoint(tmp_path):
    from pyro_vi_ext.training.checkpoint import CheckpointError, load_checkpoint

    foreign = tmp_path / "notes.txt"
    foreign.write_text("my results\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*not a valid pyro_vi_ext checkpoint"):
        _tiny_fit(tmp_path, checkpoint=foreign, resume=False)
    assert foreign.read_text() == "my results\n"
    # a real checkpoint may be overwritten by a fresh run, as before
    path = tmp_path / "run.pt"
    _tiny_fit(tmp_path, checkpoint=path)
    _tiny_fit(tmp_path, checkpoint=path, resume=False)
    assert load_checkpoint(path)["step"] == 2
