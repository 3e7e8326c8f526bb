"""beta-TCVAE setup for dSprites (Chen et al., 2018): model and factorized encoder.

beta-TCVAE is a VAE trained with a different loss: the ELBO split into index-code mutual
information, total correlation (TC) and dimension-wise KL, with the TC weighted by ``beta``. The
model and the guide are therefore an ordinary :class:`models.vae.VAE` over 64x64 binary images:

.. code-block:: text

    z_n ~ Normal(0, I_10)                              site "z", in plate "data"
    x_n | z_n ~ Bernoulli(logits=decoder(z_n))          site "x", [4096] pixels, event dim 1
    q(z_n | x_n) = Normal(mu(x_n), diag s(x_n)^2)       site "z": the factorized encoder

The loss, :class:`pyro_vi_ext.DecomposedELBO`, takes the code to be the guide's sample sites in
the data plate (here ``"z"``), evaluates ``q(z_i | x_j)`` across the minibatch from the guide's
per-point ``Normal``, and needs the data plate's full size ``N``, which the runner's ``n_data``
gives (see :func:`models._common.data_plate`). The prior ``N(0, I)`` factorizes, as the
dimension-wise KL term assumes.

Architectures (``architecture``):

* ``"mlp"`` (default): encoder ``4096 -> 512 -> 512 -> 2 z_dim``, decoder mirrored, ReLU, 4.7M
  parameters. Chen et al. used 1200 units (``hidden_dims=(1200, 1200)``, 12.8M parameters). One
  ``Trace_ELBO`` step on 256 images took about 0.3 s on one CPU thread here (0.5 s with 1200
  units): about five minutes per thousand steps.
* ``"conv"``: the 32-32-64-64 convolutional networks of :mod:`models.conv_vae` (0.8M parameters);
  closer to the paper's conv net, but slower on CPU (about 2 s per step of 256 images).

Images may be ``[B, 64, 64]`` (as :class:`pyro_vi_ext.datasets.DSprites` returns them) or
``[B, 4096]``.

Training data: a :class:`~pyro_vi_ext.datasets.DSprites` dataset yields ``(image, index)``
items; ``fit`` passes the minibatch's indices itself (``idx``), so a ``DataLoader`` with
:func:`collate_images` hands the model the images alone, rendered batch by batch.

Example (``beta=6`` is a usual beta-TCVAE weight on dSprites)::

    import pyro, torch
    from torch.utils.data import DataLoader
    from pyro_vi_ext import DecomposedELBO
    from pyro_vi_ext.datasets import DSprites
    from pyro_vi_ext.training import fit
    from models.beta_tcvae import build_beta_tcvae, collate_images

    data = DSprites()                                     # the full grid, 737,280 images
    loader = DataLoader(data, batch_size=256, collate_fn=collate_images)
    vae = build_beta_tcvae(z_dim=10, architecture="mlp")
    result = fit(vae.model, vae.guide, loader, DecomposedELBO(beta=6.0),
                 pyro.optim.Adam({"lr": 1e-3}), num_steps=20_000)
    codes, _ = vae.encode(data.images(torch.arange(1000)))   # posterior means, e.g. for MIG

References
----------
.. [1] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
   Variational Autoencoders", NeurIPS 2018.
.. [2] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
   evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from models.conv_vae import build_conv_vae
from models.vae import VAE, build_vae

Architecture = Literal["mlp", "conv"]

DSPRITES_IMAGE_SIZE = 64
"""Side of the dSprites images; the model's ``x_dim`` is its square, 4096."""

__all__ = ["DSPRITES_IMAGE_SIZE", "build_beta_tcvae", "collate_images"]


def build_beta_tcvae(
    z_dim: int = 10,
    architecture: Architecture = "mlp",
    hidden_dims: Sequence[int] = (512, 512),
    channels: Sequence[int] = (32, 32, 64, 64),
    conv_hidden_dim: int = 256,
    image_size: int = DSPRITES_IMAGE_SIZE,
    name: str = "beta_tcvae",
) -> VAE:
    """Model and factorized encoder of a beta-TCVAE over binary ``image_size`` square images.

    :param z_dim: code dimension (10 in Chen et al.).
    :param architecture: ``"mlp"`` or ``"conv"``.
    :param hidden_dims: MLP hidden widths, encoder order (the decoder mirrors them).
    :param channels: conv channels (``architecture="conv"``).
    :param conv_hidden_dim: width of the conv nets' fully connected layer.
    :param image_size: side of the images (64 for dSprites).
    :param name: prefix of the Pyro names of the networks.
    :returns: a :class:`~models.vae.VAE` with a Bernoulli likelihood; train ``vae.model`` and
        ``vae.guide`` with :class:`pyro_vi_ext.DecomposedELBO`.
    """
    if architecture == "mlp":
        return build_vae(
            x_dim=image_size * image_size,
            hidden_dim=tuple(hidden_dims),
            z_dim=z_dim,
            likelihood="bernoulli",
            name=name,
        )
    if architecture == "conv":
        return build_conv_vae(
            z_dim=z_dim,
            channels=channels,
            hidden_dim=conv_hidden_dim,
            image_size=image_size,
            likelihood="bernoulli",
            name=name,
        )
    raise ValueError(f"architecture must be 'mlp' or 'conv', got {architecture!r}")


def collate_images(items: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``collate_fn`` for a ``DataLoader`` over ``(image, index)`` items such as ``DSprites``'.

    Stacks the images into ``[B, 64, 64]`` and drops the indices, which ``fit`` passes to the
    model as ``idx`` itself; the model is then called as ``model(images, idx=..., n_data=...)``.
    """
    if not items:
        raise ValueError("collate_images got an empty batch")
    return torch.stack([item[0] for item in items])
