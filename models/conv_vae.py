"""Convolutional VAE for square single-channel images (64x64 binary images such as dSprites).

The same Pyro program as :class:`models.vae.VAE` (``z ~ N(0, I)`` and ``x | z`` in the data plate,
factorized Normal encoder, sites ``"z"`` and ``"x"``), with convolutional networks:

.. code-block:: text

    encoder  [B, 1, 64, 64] -conv-> 32x32x32 -conv-> 32x16x16 -conv-> 64x8x8 -conv-> 64x4x4
             -> flatten 1024 -> Linear 256 -> Linear 2 z_dim -> (loc, softplus scale)
    decoder  z -> Linear 256 -> Linear 1024 -> 64x4x4 -deconv-> 64x8x8 -deconv-> 32x16x16
             -deconv-> 32x32x32 -deconv-> 1x64x64 logits

Every (de)convolution has kernel 4, stride 2, padding 1 and ReLU after it (except the last). The
input ``x`` may be ``[B, 64, 64]`` (as :class:`pyro_vi_ext.datasets.DSprites` returns images),
``[B, 1, 64, 64]`` or flat ``[B, 4096]``; the observed site ``"x"`` is always the flat
``[B, 4096]`` with ``.to_event(1)``. Other image sizes work when divisible by
``2 ** len(channels)``.

Example::

    import pyro, torch
    from pyro.infer import Trace_ELBO
    from pyro_vi_ext.datasets import DSprites
    from pyro_vi_ext.training import fit
    from models.conv_vae import build_conv_vae

    data = DSprites(subgrid={"orientation": 10, "posX": 8, "posY": 8})
    images = data.images(torch.arange(len(data)))        # [11520, 64, 64], 180 MB
    vae = build_conv_vae(z_dim=10)
    result = fit(vae.model, vae.guide, images, Trace_ELBO(), pyro.optim.Adam({"lr": 1e-3}),
                 num_epochs=5, batch_size=64)

For the full grid, too large to hold, train on the dataset itself (see
:func:`models.beta_tcvae.collate_images`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.vae import VAE, GaussianHead, Likelihood, ObsScale

__all__ = ["ConvDecoder", "ConvEncoder", "build_conv_vae"]


def _check_geometry(image_size: int, channels: Sequence[int]) -> int:
    if not channels:
        raise ValueError("channels must name at least one convolution layer")
    factor = 2 ** len(channels)
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} must be divisible by 2 ** len(channels) = {factor}"
        )
    return image_size // factor


class ConvEncoder(nn.Module):
    """``x [B, image_size ** 2] -> (loc, scale)``, each ``[B, z_dim]``.

    :param z_dim: latent dimension.
    :param channels: output channels of the stride-2 convolutions (each halves the side).
    :param hidden_dim: width of the fully connected layer after the convolutions.
    :param image_size: side of the square input image.
    """

    def __init__(
        self,
        z_dim: int,
        channels: Sequence[int] = (32, 32, 64, 64),
        hidden_dim: int = 256,
        image_size: int = 64,
    ):
        super().__init__()
        side = _check_geometry(image_size, channels)
        self.image_size = image_size
        layers: list[nn.Module] = []
        fan_in = 1
        for fan_out in channels:
            layers += [nn.Conv2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            fan_in = fan_out
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(fan_in * side * side, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 2 * z_dim),
        )
        self.head = GaussianHead(z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = x.reshape(-1, 1, self.image_size, self.image_size)
        features = self.conv(images).flatten(1)
        loc, scale = self.head(self.fc(features))
        return loc.reshape(*x.shape[:-1], -1), scale.reshape(*x.shape[:-1], -1)


class ConvDecoder(nn.Module):
    """``z [..., z_dim] -> logits [..., image_size ** 2]``, mirroring :class:`ConvEncoder`.

    Any leading dims are flattened into one batch for the transposed convolutions and restored.
    """

    def __init__(
        self,
        z_dim: int,
        channels: Sequence[int] = (32, 32, 64, 64),
        hidden_dim: int = 256,
        image_size: int = 64,
    ):
        super().__init__()
        self.side = _check_geometry(image_size, channels)
        self.image_size = image_size
        self.z_dim = z_dim
        reversed_channels = list(channels)[::-1]
        self.top_channels = reversed_channels[0]
        self.fc = nn.Sequential(
            nn.Linear(z_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, self.top_channels * self.side * self.side),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        outs = [*reversed_channels[1:], 1]
        for i, (fan_in, fan_out) in enumerate(zip(reversed_channels, outs, strict=True)):
            layers.append(nn.ConvTranspose2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1))
            if i < len(outs) - 1:
                layers.append(nn.ReLU())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        features = self.fc(z.reshape(-1, self.z_dim))
        features = features.reshape(-1, self.top_channels, self.side, self.side)
        logits = self.deconv(features)
        return logits.reshape(*lead, self.image_size * self.image_size)


def build_conv_vae(
    z_dim: int = 10,
    channels: Sequence[int] = (32, 32, 64, 64),
    hidden_dim: int = 256,
    image_size: int = 64,
    likelihood: Likelihood = "bernoulli",
    obs_scale: ObsScale = "learned",
    init_obs_scale: float = 1.0,
    name: str = "conv_vae",
) -> VAE:
    """A :class:`~models.vae.VAE` with :class:`ConvEncoder` and :class:`ConvDecoder`.

    :param z_dim: latent dimension.
    :param channels: channels of the four (by default) stride-2 convolutions, 32-32-64-64.
    :param hidden_dim: width of the fully connected layer between convolutions and code.
    :param image_size: side of the square images (64).
    :param likelihood: ``"bernoulli"`` (binary images, default) or ``"gaussian"``.
    :param obs_scale: Gaussian scale: fixed float, ``"learned"`` or ``"learned_per_pixel"``.
    :param init_obs_scale: initial learned Gaussian scale.
    :param name: prefix of the Pyro names.
    """
    channels = tuple(channels)
    return VAE(
        ConvEncoder(z_dim, channels, hidden_dim, image_size),
        ConvDecoder(z_dim, channels, hidden_dim, image_size),
        x_dim=math.prod((image_size, image_size)),
        z_dim=z_dim,
        likelihood=likelihood,
        obs_scale=obs_scale,
        init_obs_scale=init_obs_scale,
        name=name,
    )
