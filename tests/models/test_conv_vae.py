import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from models.conv_vae import ConvDecoder, ConvEncoder, build_conv_vae
from models.vae import VAE
from tests.models._helpers import ALL_LOSSES, make_loss, train_and_check

N_DATA, BATCH, Z_DIM = 20, 4, 2


def _images(n: int = N_DATA, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return (torch.rand(n, size, size, generator=generator) < 0.2).float()


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_trains_with_every_loss_on_64x64_minibatches(loss_name):
    loss = make_loss(loss_name)
    vae = build_conv_vae(z_dim=Z_DIM)
    x = _images()
    idx = torch.tensor([2, 7, 11, 19])
    train_and_check(vae.model, vae.guide, loss, (x[idx],), {"idx": idx, "n_data": N_DATA}, steps=3)


def test_default_architecture():
    vae = build_conv_vae()
    assert isinstance(vae, VAE) and vae.x_dim == 4096 and vae.z_dim == 10
    convs = [m for m in vae.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [
        (1, 32),
        (32, 32),
        (32, 64),
        (64, 64),
    ]
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in convs)
    deconvs = [m for m in vae.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [
        (64, 64),
        (64, 32),
        (32, 32),
        (32, 1),
    ]
    # small enough to train on a CPU
    assert sum(p.numel() for p in vae.parameters()) < 1_000_000


def test_image_layouts_agree_and_observation_is_flat():
    vae = build_conv_vae(z_dim=Z_DIM)
    x = _images(3)
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (3, Z_DIM) and (scale > 0).all()
    for layout in (x.reshape(3, 1, 64, 64), x.reshape(3, 4096)):
        other_loc, other_scale = vae.encode(layout)
        assert torch.equal(loc, other_loc) and torch.equal(scale, other_scale)
    trace = poutine.trace(vae.model).get_trace(x)
    site = trace.nodes["x"]
    assert site["value"].shape == (3, 4096) and site["fn"].event_dim == 1
    assert site["fn"].batch_shape == (3,)


def test_decoder_keeps_leading_dims():
    decoder = ConvDecoder(z_dim=Z_DIM)
    z = torch.randn(2, 3, Z_DIM)
    logits = decoder(z)
    assert logits.shape == (2, 3, 4096)
    assert torch.allclose(logits[1, 2], decoder(z[1, 2].unsqueeze(0))[0], atol=1e-5)


def test_other_image_sizes_and_geometry_errors():
    vae = build_conv_vae(z_dim=Z_DIM, channels=(4, 8), hidden_dim=16, image_size=8)
    assert vae.x_dim == 64
    trace = poutine.trace(vae.model).get_trace(_images(5, size=8))
    assert trace.nodes["x"]["value"].shape == (5, 64)
    with pytest.raises(ValueError, match="divisible"):
        ConvEncoder(Z_DIM, channels=(4, 4, 4), image_size=20)
    with pytest.raises(ValueError, match="at least one"):
        ConvDecoder(Z_DIM, channels=())
