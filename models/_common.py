"""Shared pieces of the example models: the runner's data plate and small checks."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints


def data_plate(
    batch_size: int,
    idx: torch.Tensor | None = None,
    n_data: int | None = None,
    name: str = "data",
    dim: int | None = None,
) -> pyro.plate:
    """The plate over the data points of a minibatch, following the runner's convention.

    ``pyro_vi_ext.training.fit`` calls ``model(*batch, idx=idx, n_data=n_data)``: ``idx`` holds the
    rows of the full data set in the minibatch and ``n_data`` its size ``N``. The plate then has
    ``size=N`` and ``subsample=idx``, so Pyro scales the minibatch log-densities by ``N / B``.
    With ``idx`` and ``n_data`` left at ``None`` the minibatch is the full data (scale 1).

    :param batch_size: number ``B`` of rows in the minibatch tensors.
    :param idx: long tensor of the ``B`` row indices in the full data set, or ``None``.
    :param n_data: full data size ``N``; ``None`` means ``B`` (no subsampling).
    :param name: the plate's name (``"data"`` by convention, ``"school"`` for eight schools).
    :param dim: the plate's dim, passed to :class:`pyro.plate` (``None``: Pyro's default).
    :raises ValueError: when ``idx`` does not match the batch or holds rows outside ``[0, N)``,
        or when ``n_data`` differs from the batch size without ``idx`` (Pyro would otherwise
        draw indices unrelated to the batch).
    """
    n_data = batch_size if n_data is None else int(n_data)
    if idx is None:
        if n_data != batch_size:
            raise ValueError(
                f"n_data={n_data} differs from the batch size {batch_size}, but no idx was given: "
                "pass the minibatch's row indices as idx, or leave n_data at None for full data."
            )
    else:
        idx = torch.as_tensor(idx)
        if idx.dim() != 1 or idx.numel() != batch_size:
            raise ValueError(
                f"idx must be a 1-D tensor of the {batch_size} row indices of the minibatch, got "
                f"shape {tuple(idx.shape)}"
            )
        if idx.dtype != torch.long:
            idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_data):
            raise ValueError(
                f"idx holds rows outside [0, {n_data}); pass n_data, the full data size, with idx"
            )
    return pyro.plate(name, size=n_data, subsample=idx, dim=dim)


def check_positive(**values: float) -> None:
    """Raise ``ValueError`` unless every keyword value is a positive finite number."""
    for name, value in values.items():
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def standard_features(
    n: int, d: int, generator: torch.Generator, intercept: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``n x d`` standard normal features from ``generator``, with a column of ones appended when
    ``intercept``."""
    if n < 1 or d < 1:
        raise ValueError(f"n and d must be positive, got n={n}, d={d}")
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if intercept:
        x = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return x.to(dtype)


def sample_weight_prior(x: torch.Tensor, prior_scale: float) -> torch.Tensor:
    """The global regression weights ``w ~ N(0, prior_scale^2 I)``, one per column of ``x``."""
    loc = x.new_zeros(x.shape[-1])
    return pyro.sample("w", dist.Normal(loc, torch.full_like(loc, prior_scale)).to_event(1))


def sample_mean_field_weights(x: torch.Tensor, prefix: str, init_scale: float) -> torch.Tensor:
    """Mean-field guide ``w ~ N(<prefix>_w_loc, diag(<prefix>_w_scale)^2)``.

    The params start at ``loc = 0`` and ``scale = init_scale``.
    """
    d = x.shape[-1]
    loc = pyro.param(f"{prefix}_w_loc", lambda: x.new_zeros(d))
    scale = pyro.param(
        f"{prefix}_w_scale", lambda: x.new_full((d,), init_scale), constraint=constraints.positive
    )
    return pyro.sample("w", dist.Normal(loc, scale).to_event(1))
