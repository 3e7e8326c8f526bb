import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from models.vae import VAE, build_vae
from tests.models._helpers import ALL_LOSSES, make_loss, train_and_check

N_DATA, BATCH, X_DIM, Z_DIM = 40, 8, 12, 3

CONFIGS = {
    "bernoulli": {"likelihood": "bernoulli"},
    "gaussian_learned": {"likelihood": "gaussian", "obs_scale": "learned"},
    "gaussian_per_pixel": {"likelihood": "gaussian", "obs_scale": "learned_per_pixel"},
    "gaussian_fixed": {"likelihood": "gaussian", "obs_scale": 0.5},
}


def _data(likelihood: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if likelihood == "bernoulli":
        return (torch.rand(N_DATA, X_DIM, generator=generator) < 0.3).float()
    return torch.randn(N_DATA, X_DIM, generator=generator)


def _vae(config: str) -> VAE:
    return build_vae(x_dim=X_DIM, hidden_dim=16, z_dim=Z_DIM, **CONFIGS[config])


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_trains_with_every_loss_on_minibatches(config, loss_name):
    loss = make_loss(loss_name)
    vae = _vae(config)
    x = _data(CONFIGS[config]["likelihood"])
    idx = torch.tensor([0, 3, 5, 11, 17, 22, 30, 39])
    train_and_check(vae.model, vae.guide, loss, (x[idx],), {"idx": idx, "n_data": N_DATA})
    names = set(pyro.get_param_store().keys())
    assert any(name.startswith("vae_encoder$$$") for name in names)
    assert any(name.startswith("vae_decoder$$$") for name in names)
    learned = config in ("gaussian_learned", "gaussian_per_pixel")
    assert ("vae_x_scale" in names) == learned
    if learned:
        shape = (X_DIM,) if config == "gaussian_per_pixel" else ()
        assert pyro.param("vae_x_scale").shape == shape


def test_sites_follow_the_convention():
    vae = _vae("bernoulli")
    x = _data("bernoulli")
    idx = torch.arange(BATCH) * 2
    guide_trace = poutine.trace(vae.guide).get_trace(x[idx], idx=idx, n_data=N_DATA)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(
        x[idx], idx=idx, n_data=N_DATA
    )
    for trace in (guide_trace, model_trace):
        z = trace.nodes["z"]
        assert z["fn"].event_dim == 1 and z["fn"].batch_shape == (BATCH,)
        assert isinstance(z["fn"], dist.Independent)
        assert isinstance(z["fn"].base_dist, dist.Normal)
        frames = [f for f in z["cond_indep_stack"] if f.vectorized]
        assert [(f.name, f.size, f.full_size) for f in frames] == [("data", BATCH, N_DATA)]
        assert z["value"].shape == (BATCH, Z_DIM)
    prior = model_trace.nodes["z"]["fn"].base_dist
    assert torch.equal(prior.loc, torch.zeros(BATCH, Z_DIM))
    assert torch.equal(prior.scale, torch.ones(BATCH, Z_DIM))
    site = model_trace.nodes["x"]
    assert site["is_observed"] and site["fn"].event_dim == 1
    assert torch.equal(site["value"], x[idx])
    # the guide's code is a diagonal Normal whose per-point densities cross the batch ([B, B, D])
    fn, z = guide_trace.nodes["z"]["fn"], guide_trace.nodes["z"]["value"]
    cross = fn.base_dist.log_prob(z[:, None, :])
    assert cross.shape == (BATCH, BATCH, Z_DIM)
    assert torch.allclose(cross.diagonal(dim1=0, dim2=1).T.sum(-1), fn.log_prob(z))


def test_minibatch_log_likelihood_is_scaled_by_n_over_b():
    vae = _vae("gaussian_learned")
    x = _data("gaussian")
    idx = torch.tensor([1, 2, 7, 9, 20, 21, 33, 38])
    model_trace = poutine.trace(vae.model).get_trace(x[idx], idx=idx, n_data=N_DATA)
    model_trace.compute_log_prob()
    for name in ("z", "x"):
        site = model_trace.nodes[name]
        assert site["scale"] == pytest.approx(N_DATA / BATCH)
        assert torch.allclose(
            site["log_prob_sum"], site["unscaled_log_prob"].sum() * N_DATA / BATCH
        )
    # full data by hand: scale 1
    full = poutine.trace(vae.model).get_trace(x)
    assert full.nodes["x"]["scale"] == 1.0
    assert full.nodes["x"]["value"].shape == (N_DATA, X_DIM)


def test_gaussian_likelihood_density():
    vae = _vae("gaussian_fixed")
    x = _data("gaussian")[:BATCH]
    trace = poutine.trace(vae.model).get_trace(x)
    z = trace.nodes["z"]["value"]
    expected = dist.Normal(vae.decoder(z), 0.5).log_prob(x).sum(-1)
    assert torch.allclose(trace.nodes["x"]["fn"].log_prob(x), expected)
    assert "vae_x_scale" not in pyro.get_param_store()


def test_bernoulli_likelihood_density_and_grey_levels():
    vae = _vae("bernoulli")
    x = torch.rand(BATCH, X_DIM)  # grey levels in [0, 1]: accepted, negative cross-entropy
    trace = poutine.trace(vae.model).get_trace(x)
    logits = vae.decoder(trace.nodes["z"]["value"])
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, x, reduction="none"
    ).sum(-1)
    assert torch.allclose(trace.nodes["x"]["fn"].log_prob(x), expected, atol=1e-5)


def test_images_are_flattened_and_networks_are_exposed():
    vae = build_vae(x_dim=16, hidden_dim=(8, 6), z_dim=2)
    images = (torch.rand(5, 4, 4) < 0.5).float()
    loc, scale = vae.encode(images)
    assert loc.shape == scale.shape == (5, 2) and (scale > 0).all()
    flat_loc, _ = vae.encode(images.reshape(5, 16))
    assert torch.equal(loc, flat_loc)
    trace = poutine.trace(vae.model).get_trace(images)
    assert trace.nodes["x"]["value"].shape == (5, 16)
    probs = vae.decode(torch.randn(7, 5, 2))  # any leading dims
    assert probs.shape == (7, 5, 16) and ((probs >= 0) & (probs <= 1)).all()
    # the decoder mirrors the encoder's hidden widths
    widths = [m.out_features for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [6, 8, 16]
    with pytest.raises(ValueError, match="x_dim=16"):
        vae.encode(torch.zeros(5, 15))


def test_learned_scale_receives_the_likelihood_gradient():
    """With a scale far above the residuals, the loss must decrease as the scale shrinks."""
    vae = build_vae(x_dim=4, hidden_dim=8, z_dim=1, likelihood="gaussian", init_obs_scale=5.0)
    x = 0.1 * torch.randn(64, 4)
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    raw = pyro.get_param_store().get_param("vae_x_scale").unconstrained()
    assert raw.grad is not None and float(raw.grad) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"likelihood": "poisson"}, "likelihood"),
        ({"likelihood": "gaussian", "obs_scale": "wide"}, "obs_scale"),
        ({"likelihood": "gaussian", "obs_scale": -1.0}, "obs_scale"),
        ({"likelihood": "gaussian", "init_obs_scale": 0.0}, "init_obs_scale"),
        ({"hidden_dim": 0}, "hidden"),
    ],
)
def test_invalid_configurations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_vae(x_dim=4, z_dim=2, **{"hidden_dim": 8, **kwargs})
