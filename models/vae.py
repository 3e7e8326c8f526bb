"""Variational autoencoder (Kingma & Welling, 2014) with MLP encoder and decoder.

The generative model and the amortized guide, for data points ``x_n`` of ``x_dim`` values:

.. code-block:: text

    z_n ~ Normal(0, I)                          site "z", event dim 1, in plate "data"
    x_n | z_n ~ Bernoulli(logits=f(z_n))        site "x", event dim 1, in plate "data"
            or Normal(f(z_n), sigma)
    q(z_n | x_n) = Normal(mu(x_n), diag s(x_n)^2)   the factorized encoder, site "z"

:class:`VAE` holds any encoder (``x -> (loc, scale)``) and decoder (``z -> logits or loc``), so
the convolutional VAE (:mod:`models.conv_vae`) and the beta-TCVAE setup (:mod:`models.beta_tcvae`)
are the same class with other networks. Its :meth:`VAE.model` and :meth:`VAE.guide` follow the
runner's minibatch convention: ``model(x, idx=idx, n_data=n_data)`` puts ``z`` and ``x`` in
``pyro.plate("data", size=n_data, subsample=idx)``, so the minibatch log-density is scaled by
``N / B``; ``model(x)`` alone uses ``x`` as the full data.

Likelihoods
-----------
* ``"bernoulli"``: ``Bernoulli(logits=decoder(z)).to_event(1)``, for binary data. Values in
  ``[0, 1]`` (grey-level images) are accepted too: the distribution is built with
  ``validate_args=False`` and its log-density is then the negative binary cross-entropy, the
  usual (unnormalized) choice for such data.
* ``"gaussian"``: ``Normal(decoder(z), sigma).to_event(1)``. ``obs_scale`` chooses ``sigma``: a
  float keeps it fixed; ``"learned"`` (default) learns one global ``sigma``, ``"learned_per_pixel"``
  one per data dimension, both as ``pyro.param(f"{name}_x_scale")`` with a positive constraint
  (initialized at ``init_obs_scale``).

Inputs ``x`` are ``[B, x_dim]`` or ``[B, *shape]`` with ``prod(shape) == x_dim`` (images are
flattened); the observed site ``"x"`` is always ``[B, x_dim]``. The networks are registered with
``pyro.module(f"{name}_encoder")`` (guide) and ``pyro.module(f"{name}_decoder")`` (model); give two
VAEs sharing one param store different names.

Example::

    import pyro, torch
    from pyro_vi_ext import ImportanceWeightedELBO
    from pyro_vi_ext.training import fit
    from models.vae import build_vae

    x = (torch.rand(1000, 784) < 0.3).float()
    vae = build_vae(x_dim=784, hidden_dim=400, z_dim=20, likelihood="bernoulli")
    result = fit(vae.model, vae.guide, x, ImportanceWeightedELBO(num_particles=5, estimator="dreg"),
                 pyro.optim.Adam({"lr": 1e-3}), num_epochs=10, batch_size=64)
    # fit's step is SVI's: svi.step(x[idx], idx=idx, n_data=len(x)) with idx the minibatch rows
    loc, scale = vae.encode(x[:10])                # posterior means, e.g. for metrics

References
----------
.. [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
.. [2] D. J. Rezende, S. Mohamed, D. Wierstra, "Stochastic Backpropagation and Approximate
   Inference in Deep Generative Models", ICML 2014.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from models._common import data_plate

Likelihood = Literal["bernoulli", "gaussian"]
ObsScale = float | Literal["learned", "learned_per_pixel"]

__all__ = ["VAE", "GaussianHead", "MLPDecoder", "MLPEncoder", "build_vae"]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _hidden(hidden_dims: int | Sequence[int]) -> tuple[int, ...]:
    dims = (hidden_dims,) if isinstance(hidden_dims, int) else tuple(hidden_dims)
    if any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"hidden sizes must be positive ints, got {hidden_dims!r}")
    return dims


class GaussianHead(nn.Module):
    """Split a ``[..., 2 * z_dim]`` feature into ``loc`` and a positive ``scale``.

    ``scale = softplus(raw) + min_scale``: smooth, never below ``min_scale``.
    """

    def __init__(self, z_dim: int, min_scale: float = 1e-4):
        super().__init__()
        self.z_dim = z_dim
        self.min_scale = float(min_scale)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = features.split(self.z_dim, dim=-1)
        return loc, F.softplus(raw_scale) + self.min_scale


class MLPEncoder(nn.Module):
    """``x [B, x_dim] -> (loc, scale)``, each ``[B, z_dim]``: an MLP with ReLU hidden layers."""

    def __init__(self, x_dim: int, hidden_dims: int | Sequence[int], z_dim: int):
        super().__init__()
        self.net = _mlp((x_dim, *_hidden(hidden_dims), 2 * z_dim))
        self.head = GaussianHead(z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.net(x))


class MLPDecoder(nn.Module):
    """``z [..., z_dim] -> [..., x_dim]`` (Bernoulli logits or Gaussian means); any leading dims."""

    def __init__(self, z_dim: int, hidden_dims: int | Sequence[int], x_dim: int):
        super().__init__()
        self.net = _mlp((z_dim, *_hidden(hidden_dims), x_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    """A VAE as a Pyro model and guide around an encoder and a decoder network.

    :param encoder: module mapping ``x [B, x_dim]`` to ``(loc, scale)``, each ``[B, z_dim]``.
    :param decoder: module mapping ``z [..., z_dim]`` to ``[..., x_dim]``: logits (Bernoulli) or
        means (Gaussian). It must accept any leading dims (particles are vectorized on the left).
    :param x_dim: number of values per data point.
    :param z_dim: latent dimension.
    :param likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :param obs_scale: Gaussian only: a fixed float, ``"learned"`` (one global scale) or
        ``"learned_per_pixel"``; ignored for Bernoulli.
    :param init_obs_scale: initial value of a learned Gaussian scale.
    :param name: prefix of the Pyro names of the networks and of the learned scale.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        x_dim: int,
        z_dim: int,
        likelihood: Likelihood = "bernoulli",
        obs_scale: ObsScale = "learned",
        init_obs_scale: float = 1.0,
        name: str = "vae",
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        if likelihood == "gaussian":
            if isinstance(obs_scale, str):
                if obs_scale not in ("learned", "learned_per_pixel"):
                    raise ValueError(
                        "obs_scale must be a positive float, 'learned' or 'learned_per_pixel', "
                        f"got {obs_scale!r}"
                    )
            elif not (math.isfinite(float(obs_scale)) and float(obs_scale) > 0):
                raise ValueError(f"a fixed obs_scale must be a positive float, got {obs_scale!r}")
            if not float(init_obs_scale) > 0:
                raise ValueError(f"init_obs_scale must be positive, got {init_obs_scale!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.x_dim = int(x_dim)
        self.z_dim = int(z_dim)
        self.likelihood: Likelihood = likelihood
        self.obs_scale: ObsScale = obs_scale
        self.init_obs_scale = float(init_obs_scale)
        self.name = name

    # -- helpers ------------------------------------------------------------------------------
    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"x must be [B, x_dim] or [B, *shape], got shape {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.x_dim:
            raise ValueError(
                f"{self.name}: each data point must hold x_dim={self.x_dim} values, got shape "
                f"{tuple(x.shape)}"
            )
        return flat

    def _scale(self, like: torch.Tensor) -> torch.Tensor:
        """The Gaussian observation scale (a param site when learned)."""
        if not isinstance(self.obs_scale, str):
            return like.new_tensor(float(self.obs_scale))
        shape = (self.x_dim,) if self.obs_scale == "learned_per_pixel" else ()
        return pyro.param(
            f"{self.name}_x_scale",
            lambda: like.new_full(shape, self.init_obs_scale),
            constraint=constraints.positive,
        )

    def _observation(self, decoded: torch.Tensor) -> dist.TorchDistribution:
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=decoded, validate_args=False).to_event(1)
        return dist.Normal(decoded, self._scale(decoded)).to_event(1)

    # -- the Pyro program ---------------------------------------------------------------------
    def model(
        self,
        x: torch.Tensor,
        *,
        idx: torch.Tensor | None = None,
        n_data: int | None = None,
    ) -> torch.Tensor:
        """``z ~ N(0, I)``, ``x ~ p(x | z)`` in the data plate; returns the decoder output."""
        pyro.module(f"{self.name}_decoder", self.decoder)
        x = self._flatten(x)
        batch = x.shape[0]
        with data_plate(batch, idx, n_data):
            prior = dist.Normal(x.new_zeros(batch, self.z_dim), x.new_ones(batch, self.z_dim))
            z = pyro.sample("z", prior.to_event(1))
            decoded = self.decoder(z)
            pyro.sample("x", self._observation(decoded), obs=x)
        return decoded

    def guide(
        self,
        x: torch.Tensor,
        *,
        idx: torch.Tensor | None = None,
        n_data: int | None = None,
    ) -> torch.Tensor:
        """``z ~ Normal(loc(x), scale(x))`` (diagonal) in the data plate; returns ``z``."""
        pyro.module(f"{self.name}_encoder", self.encoder)
        x = self._flatten(x)
        with data_plate(x.shape[0], idx, n_data):
            loc, scale = self.encoder(x)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # -- plain network access -----------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation ``[B, z_dim]`` of ``q(z | x)`` (no Pyro sites)."""
        return self.encoder(self._flatten(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``p(x | z)``, ``[..., x_dim]``: probabilities (Bernoulli) or means (Gaussian)."""
        decoded = self.decoder(z)
        return torch.sigmoid(decoded) if self.likelihood == "bernoulli" else decoded


def build_vae(
    x_dim: int = 784,
    hidden_dim: int | Sequence[int] = 400,
    z_dim: int = 20,
    likelihood: Likelihood = "bernoulli",
    obs_scale: ObsScale = "learned",
    init_obs_scale: float = 1.0,
    name: str = "vae",
) -> VAE:
    """An MLP VAE: encoder ``x_dim -> hidden -> 2 z_dim`` and decoder ``z_dim -> hidden -> x_dim``.

    :param x_dim: values per data point (784 for 28x28 images).
    :param hidden_dim: width of the hidden layer, or a sequence of widths (encoder order; the
        decoder mirrors it).
    :param z_dim: latent dimension.
    :param likelihood: ``"bernoulli"`` (binary or [0, 1] data) or ``"gaussian"``.
    :param obs_scale: Gaussian scale: fixed float, ``"learned"`` or ``"learned_per_pixel"``.
    :param init_obs_scale: initial learned Gaussian scale.
    :param name: prefix of the Pyro names.
    """
    hidden = _hidden(hidden_dim)
    return VAE(
        MLPEncoder(x_dim, hidden, z_dim),
        MLPDecoder(z_dim, hidden[::-1], x_dim),
        x_dim=x_dim,
        z_dim=z_dim,
        likelihood=likelihood,
        obs_scale=obs_scale,
        init_obs_scale=init_obs_scale,
        name=name,
    )
