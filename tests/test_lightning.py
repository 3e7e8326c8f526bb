"""ImportanceWeightedELBO trained through ELBOModule in a Lightning Trainer (CPU, a few steps)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from examples.lightning_iwae import build_module  # noqa: E402 - needs lightning

STEPS = 6


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """Lightning prints its accelerator banner at INFO; keep test output short."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((32, 12), 0.3), generator=generator)


def _trainer() -> pl.Trainer:
    return pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.filterwarnings("ignore:.*was not registered in the param store:UserWarning")
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
def test_lightning_takes_the_steps_of_a_plain_torch_loop():
    """Same seed, same batches: Lightning's parameters equal those of a hand-written loop."""
    x = _data()
    torch.manual_seed(0)
    module = build_module(x.shape[1], latent_dim=2, hidden=8, num_particles=4, lr=1e-2)
    reference = copy.deepcopy(module)
    before = [p.detach().clone() for p in module.parameters()]

    torch.manual_seed(1)
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    _trainer().fit(module, loader)

    torch.manual_seed(1)
    optimizer = reference.configure_optimizers()
    losses = []
    while len(losses) < STEPS:
        for (batch,) in loader:  # a DataLoader iterator draws its base seed: iterate it too
            optimizer.zero_grad()
            loss = reference.elbo(batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

    trained = list(module.parameters())
    assert len(trained) == 10  # encoder (3 layers) and decoder (2): the ELBOModule's own
    assert any(not torch.equal(p, b) for p, b in zip(trained, before, strict=True))
    for got, expected in zip(trained, reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert set(module.loss.last_terms) >= {"iw_bound", "elbo", "ess"}
    assert module.loss.last_terms["iw_bound"] >= module.loss.last_terms["elbo"] - 1e-4
    assert all(torch.isfinite(torch.tensor(losses)))
