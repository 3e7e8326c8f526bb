"""A minimal MLP VAE (784-400-20, Bernoulli likelihood) shared by the benchmarks.

Two faces of the same networks:

* :class:`PyroVAE`: ``model`` / ``guide`` for Pyro, networks registered with ``pyro.module``;
* :func:`handwritten_iw_loss`: the IWAE / STL / DReG losses written directly in PyTorch with
  ``torch.distributions`` and ``logsumexp``, the reference the Pyro losses are timed against.

Data: random binary images made procedurally with a fixed seed (prototypes with flipped pixels),
so the benchmark needs no download.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

X_DIM, H_DIM, Z_DIM = 784, 400, 20


def binary_data(num: int, seed: int = 0, num_prototypes: int = 10, flip: float = 0.1):
    """Return ``[num, 784]`` float 0/1 images, procedural.

    One of ``num_prototypes`` random prototypes per row, each pixel flipped with probability
    ``flip``.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(num_prototypes, X_DIM, generator=generator) < 0.3).float()
    labels = torch.randint(num_prototypes, (num,), generator=generator)
    flips = (torch.rand(num, X_DIM, generator=generator) < flip).float()
    return (prototypes[labels] + flips) % 2


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(X_DIM, H_DIM)
        self.loc = nn.Linear(H_DIM, Z_DIM)
        self.scale = nn.Linear(H_DIM, Z_DIM)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(Z_DIM, H_DIM), nn.Tanh(), nn.Linear(H_DIM, X_DIM))

    def forward(self, z):
        return self.net(z)


def make_networks(seed: int = 0) -> tuple[Encoder, Decoder]:
    torch.manual_seed(seed)
    return Encoder(), Decoder()


class PyroVAE:
    """Pyro model and guide over given networks (``pyro.module`` registers their parameters)."""

    def __init__(self, encoder: Encoder, decoder: Decoder, prefix: str = ""):
        self.encoder, self.decoder = encoder, decoder
        # distinct module names per instance: two VAEs registered under one name share the
        # store's tensors, and SVI would then update the first VAE's networks
        self.prefix = prefix

    def model(self, x):
        pyro.module(self.prefix + "decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(Z_DIM), x.new_ones(Z_DIM)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module(self.prefix + "encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def handwritten_iw_loss(
    encoder: Encoder, decoder: Decoder, x: torch.Tensor, k: int, estimator: str
) -> torch.Tensor:
    """``-sum_b log (1/K) sum_k w_bk`` whose gradient is the chosen estimator.

    * ``iwae``: plain reparameterized gradient;
    * ``stl``: log q evaluated at the detached encoder outputs (path derivative only);
    * ``dreg``: the same detached log q, and a hook on ``z`` multiplying its gradient by the
      normalized weight, which turns ``w~_k d log w_k / dz_k`` into ``w~_k^2 d log w_k / dz_k``
      for the encoder while the decoder keeps the IWAE gradient ``w~_k d log p / d theta``.
    """
    loc, scale = encoder(x)
    eps = torch.randn((k,) + loc.shape, dtype=loc.dtype)
    z = loc + scale * eps  # [K, B, Z]
    prior = torch.distributions.Normal(torch.zeros_like(loc), torch.ones_like(loc))
    log_lik = torch.distributions.Bernoulli(logits=decoder(z)).log_prob(x).sum(-1)
    log_p = prior.log_prob(z).sum(-1) + log_lik
    if estimator == "iwae":
        q = torch.distributions.Normal(loc, scale)
    else:
        q = torch.distributions.Normal(loc.detach(), scale.detach())
    log_w = log_p - q.log_prob(z).sum(-1)  # [K, B]
    if estimator == "dreg" and z.requires_grad:
        normalized = torch.softmax(log_w.detach(), 0).unsqueeze(-1)
        z.register_hook(lambda grad: grad * normalized)
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    return -bound.sum()
