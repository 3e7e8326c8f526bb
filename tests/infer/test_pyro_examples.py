"""Models from Pyro's examples and tutorials, unchanged, trained with the bound losses.

Pyro's VAE example (``pyro.module``'d encoder and decoder, ``pyro.plate("data", x.shape[0])``),
small sizes; the Bayesian-regression tutorial and the mixture model are in ``test_sequential.py``
and ``test_enumeration.py``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vi_ext import ImportanceWeightedELBO, RenyiAlphaELBO
from tests.infer.toy_models import single_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
X_DIM, H_DIM, Z_DIM = 12, 16, 2


class Encoder(nn.Module):
    """Pyro VAE example's encoder: x -> (z_loc, z_scale)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(X_DIM, H_DIM)
        self.fc21 = nn.Linear(H_DIM, Z_DIM)
        self.fc22 = nn.Linear(H_DIM, Z_DIM)
        self.softplus = nn.Softplus()

    def forward(self, x):
        """Return the guide's location and scale for ``x``."""
        x = x.reshape(-1, X_DIM)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    """Pyro VAE example's decoder: z -> Bernoulli probabilities."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(Z_DIM, H_DIM)
        self.fc21 = nn.Linear(H_DIM, X_DIM)
        self.softplus = nn.Softplus()

    def forward(self, z):
        """Return pixel probabilities for ``z``."""
        hidden = self.softplus(self.fc1(z))
        return torch.sigmoid(self.fc21(hidden))


class VAE(nn.Module):
    """Pyro's VAE example, model and guide as written there."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def model(self, x):
        """Decode a standard-normal code per image."""
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], Z_DIM)))
            z_scale = x.new_ones(torch.Size((x.shape[0], Z_DIM)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img).to_event(1), obs=x.reshape(-1, X_DIM))

    def guide(self, x):
        """Encode each image into a diagonal Normal."""
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def _images():
    generator = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(3, X_DIM, generator=generator) < 0.4).float()
    return prototypes[torch.randint(3, (24,), generator=generator)]


@pytest.mark.parametrize(
    "loss",
    [
        ImportanceWeightedELBO(num_particles=5, estimator="dreg"),
        ImportanceWeightedELBO(num_particles=5, vectorize_particles=False),
        RenyiAlphaELBO(num_particles=5, alpha=0.5, estimator="stl"),
    ],
    ids=["iw-dreg-vectorized", "iw-sequential", "renyi-stl"],
)
def test_pyro_vae_example_trains_unchanged(loss):
    """Check: the VAE example trains in SVI with every particle path (loss goes down)."""
    pyro.set_rng_seed(0)
    vae = VAE()
    x = _images()
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.02}), loss=loss)
    losses = [svi.step(x[i % 3 * 8 : i % 3 * 8 + 8]) for i in range(30)]
    assert sum(losses[-6:]) < sum(losses[:6])
    assert loss.last_terms[loss.bound_term] >= loss.last_terms["elbo"] - 1e-4
