import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.utils.data import DataLoader

from models.beta_tcvae import DSPRITES_IMAGE_SIZE, build_beta_tcvae, collate_images
from models.vae import VAE
from pyro_vi_ext.datasets import DSprites
from pyro_vi_ext.training import fit
from tests.models._helpers import ALL_LOSSES, make_loss, train_and_check

BATCH = 6


@pytest.fixture(scope="module")
def dsprites():
    """A small procedural dSprites grid and one minibatch of its images with their indices."""
    data = DSprites(subgrid={"scale": 2, "orientation": 2, "posX": 4, "posY": 4})
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:BATCH]
    return data, idx, data.images(idx)


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_mlp_trains_with_every_loss_on_dsprites(dsprites, loss_name):
    loss = make_loss(loss_name, beta=6.0)  # the beta-TCVAE weights when decomposed
    data, idx, images = dsprites
    assert images.shape == (BATCH, 64, 64)
    vae = build_beta_tcvae(z_dim=4, hidden_dims=(32, 32))
    train_and_check(vae.model, vae.guide, loss, (images,), {"idx": idx, "n_data": len(data)})


@pytest.mark.parametrize("loss_name", ["trace_elbo", "decomposed"])
def test_conv_trains_on_dsprites(dsprites, loss_name):
    loss = make_loss(loss_name, beta=6.0)
    data, idx, images = dsprites
    vae = build_beta_tcvae(z_dim=4, architecture="conv", channels=(8, 8, 16, 16))
    train_and_check(
        vae.model, vae.guide, loss, (images,), {"idx": idx, "n_data": len(data)}, steps=3
    )


def test_defaults_follow_the_setup():
    vae = build_beta_tcvae()
    assert isinstance(vae, VAE)
    assert vae.z_dim == 10 and vae.x_dim == DSPRITES_IMAGE_SIZE**2 == 4096
    assert vae.likelihood == "bernoulli" and vae.name == "beta_tcvae"
    widths = [m.out_features for m in vae.encoder.modules() if isinstance(m, nn.Linear)]
    assert widths == [512, 512, 20]
    conv = build_beta_tcvae(architecture="conv")
    assert any(isinstance(m, nn.Conv2d) for m in conv.encoder.modules())
    with pytest.raises(ValueError, match="architecture"):
        build_beta_tcvae(architecture="resnet")


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_the_code_is_the_only_local_guide_site_and_is_factorized(dsprites, architecture):
    """What DecomposedELBO relies on: the guide's sites in the data plate, with N attached."""
    data, idx, images = dsprites
    vae = build_beta_tcvae(z_dim=5, architecture=architecture, hidden_dims=(16,))
    trace = poutine.trace(vae.guide).get_trace(images, idx=idx, n_data=len(data))
    assert torch.equal(trace.nodes["data"]["value"], idx)  # the plate's subsample is the batch
    trace = prune_subsample_sites(trace)
    sites = [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    ]
    assert [name for name, _ in sites] == ["z"]
    site = sites[0][1]
    (frame,) = [f for f in site["cond_indep_stack"] if f.vectorized]
    assert (frame.name, frame.size, frame.full_size) == ("data", BATCH, len(data))
    fn = site["fn"]
    assert isinstance(fn, dist.Independent) and isinstance(fn.base_dist, dist.Normal)
    assert fn.batch_shape == (BATCH,) and fn.event_shape == (5,)
    # the prior factorizes over the code's dimensions
    model_trace = poutine.trace(poutine.replay(vae.model, trace=trace)).get_trace(
        images, idx=idx, n_data=len(data)
    )
    prior = model_trace.nodes["z"]["fn"]
    z = site["value"]
    assert torch.allclose(prior.log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


@pytest.mark.parametrize("loss_name", ["trace_elbo", "decomposed"])
def test_fits_on_the_dataset_with_collate_images(dsprites, loss_name):
    """The runner over a DSprites DataLoader: images rendered per batch, idx passed by fit."""
    loss = make_loss(loss_name, beta=6.0)
    data, _, _ = dsprites
    seen = []
    vae = build_beta_tcvae(z_dim=3, hidden_dims=(16,))

    def recording_model(x, *, idx=None, n_data=None):  # what fit passes to the model
        seen.append((x.shape, n_data))
        assert torch.equal(x, data.images(idx))
        return vae.model(x, idx=idx, n_data=n_data)

    loader = DataLoader(data, batch_size=BATCH, collate_fn=collate_images)
    result = fit(
        recording_model,
        vae.guide,
        loader,
        loss,
        pyro.optim.Adam({"lr": 1e-3}),
        num_steps=3,
        progress=False,
    )
    assert all(math.isfinite(v) for v in result.history["loss"])
    assert len(seen) >= 3
    assert all(shape == (BATCH, 64, 64) and n == len(data) for shape, n in seen)
    with pytest.raises(ValueError, match="empty"):
        collate_images([])
