"""Train a VAE with :class:`pyro_vi_ext.ImportanceWeightedELBO` (DReG) in a Lightning ``Trainer``.

Pyro's losses become ``torch.nn.Module`` objects through ``loss(model, guide)`` (an
``ELBOModule`` whose ``forward`` is the loss's ``differentiable_loss``), so a plain torch
optimizer and Lightning's loop train them like any other module; Lightning then brings its
loggers, checkpoints, device placement and strategies. Run from the repository root::

    python -m examples.lightning_iwae --steps 300

The model is a small VAE on procedurally rendered dSprites images
(:class:`pyro_vi_ext.datasets.DSprites`, nothing is downloaded). The model and guide are
``PyroModule`` objects, so their parameters are the ``ELBOModule``'s own and no ``pyro.param``
store is involved.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_vi_ext import ImportanceWeightedELBO

__all__ = ["Decoder", "Encoder", "IWAEModule", "build_module", "main"]


class Encoder(PyroModule):
    """Guide ``q(z | x) = Normal(mu(x), sigma(x))`` in the data plate, an MLP."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(data_dim, hidden), nn.Softplus())
        self.loc = nn.Linear(hidden, latent_dim)
        self.log_scale = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor) -> None:
        """Sample ``z`` for every row of ``x``."""
        hidden = self.net(x)
        with pyro.plate("data", x.shape[0]):
            scale = self.log_scale(hidden).exp()
            pyro.sample("z", dist.Normal(self.loc(hidden), scale).to_event(1))


class Decoder(PyroModule):
    """Model ``z ~ N(0, I)``, ``x | z ~ Bernoulli(logits(z))`` in the data plate, an MLP."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Softplus(), nn.Linear(hidden, data_dim)
        )

    def forward(self, x: torch.Tensor) -> None:
        """Score ``x`` under the decoder, with its latent code drawn from the prior."""
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.net(z)).to_event(1), obs=x)


class IWAEModule(pl.LightningModule):
    """A LightningModule whose training step is the importance-weighted loss of one batch.

    Parameters
    ----------
    model, guide
        Pyro model and guide (``PyroModule`` objects).
    loss
        A Pyro ELBO, e.g. ``ImportanceWeightedELBO(num_particles=5, estimator="dreg")``.
    lr
        Adam's learning rate.
    """

    def __init__(self, model: PyroModule, guide: PyroModule, loss: pyro.infer.ELBO, lr: float):
        super().__init__()
        self.elbo = loss(model, guide)  # an ELBOModule: model and guide are its submodules
        self.loss = loss
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Return the loss of one batch; log it and the terms the loss reports."""
        (x,) = batch
        value = self.elbo(x)
        self.log("loss", value, prog_bar=True)
        for name, term in getattr(self.loss, "last_terms", {}).items():
            self.log(name, float(term))
        return value

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the model's and guide's parameters."""
        return torch.optim.Adam(self.elbo.parameters(), lr=self.lr)


def build_module(
    data_dim: int,
    latent_dim: int = 4,
    hidden: int = 64,
    num_particles: int = 5,
    estimator: str = "dreg",
    lr: float = 1e-3,
) -> IWAEModule:
    """Build the VAE, its IWAE loss and the LightningModule that trains them.

    Parameters
    ----------
    data_dim
        Number of pixels of one (flattened) image.
    latent_dim, hidden
        Size of the code and of the hidden layers.
    num_particles, estimator
        ``K`` and the gradient estimator of :class:`~pyro_vi_ext.ImportanceWeightedELBO`.
    lr
        Adam's learning rate.

    Returns
    -------
    IWAEModule
    """
    loss = ImportanceWeightedELBO(num_particles=num_particles, estimator=estimator)
    return IWAEModule(
        Decoder(data_dim, latent_dim, hidden), Encoder(data_dim, latent_dim, hidden), loss, lr
    )


def _images(num_images: int, seed: int) -> torch.Tensor:
    from pyro_vi_ext.datasets import DSprites

    data = DSprites(subgrid={"orientation": 8, "posX": 8, "posY": 8}, image_size=16, flatten=True)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data), generator=generator)[:num_images]
    return data.images(rows)


def main(argv: list[str] | None = None) -> None:
    """Train on CPU for ``--steps`` steps and print the final importance-weighted bound."""
    parser = argparse.ArgumentParser(prog="python -m examples.lightning_iwae")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    x = _images(args.num_images, args.seed)
    module = build_module(x.shape[1])
    loader = DataLoader(TensorDataset(x), batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    bound = module.loss.last_terms.get("iw_bound", float("nan"))
    print(f"IWAE bound per image after {args.steps} steps: {bound:.2f} nats")


if __name__ == "__main__":
    main()
