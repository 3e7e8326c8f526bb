"""Shared by the model tests: every loss of the package and a short training run that checks it."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_vi_ext
from pyro_vi_ext import ImportanceWeightedELBO

NUM_PARTICLES = 3
IW_ESTIMATORS = ("iwae", "stl", "dreg")
ALL_LOSSES = ("trace_elbo", *IW_ESTIMATORS, "decomposed")
"""Pyro's Trace_ELBO and every loss of the package (DecomposedELBO once it exists)."""
GLOBAL_LATENT_LOSSES = ("trace_elbo", *IW_ESTIMATORS)
"""The losses that apply to models with global latents: DecomposedELBO needs a local code
(a VAE's ``z``) and is left out for regression and eight schools."""


def make_loss(name: str, **decomposed_options) -> pyro.infer.ELBO:
    """A fresh loss by name; skips the test when DecomposedELBO is not in the package yet.

    ``decomposed_options`` go to ``DecomposedELBO`` (e.g. ``beta=6.0``) and nowhere else.
    """
    if name == "trace_elbo":
        return Trace_ELBO()
    if name in IW_ESTIMATORS:
        return ImportanceWeightedELBO(num_particles=NUM_PARTICLES, estimator=name)
    if name == "decomposed":
        if not hasattr(pyro_vi_ext, "DecomposedELBO"):
            pytest.skip("pyro_vi_ext.DecomposedELBO is not in the package yet")
        return pyro_vi_ext.DecomposedELBO(**decomposed_options)
    raise ValueError(f"unknown loss {name!r}")


def param_snapshot() -> dict[str, torch.Tensor]:
    """Unconstrained values of every param in Pyro's param store (``pyro.module`` ones included)."""
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained().detach().clone() for name in store.keys()}


def train_and_check(
    model: Callable,
    guide: Callable,
    loss: pyro.infer.ELBO,
    args: tuple,
    kwargs: dict | None = None,
    steps: int = 4,
    lr: float = 1e-2,
) -> list[float]:
    """Run ``steps`` SVI steps; assert finite losses and that every parameter moved.

    The first step creates the parameters (``pyro.param`` and ``pyro.module`` are lazy); every
    parameter must differ from its value after that step once the remaining steps are done.
    """
    kwargs = {} if kwargs is None else kwargs
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    losses = [svi.step(*args, **kwargs)]
    before = param_snapshot()
    assert before, "the model and guide registered no parameters"
    losses += [svi.step(*args, **kwargs) for _ in range(steps - 1)]
    assert all(math.isfinite(value) for value in losses), losses
    after = param_snapshot()
    assert after.keys() == before.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    return losses
