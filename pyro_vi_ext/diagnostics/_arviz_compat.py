"""The one place that knows which ArviZ is installed (0.23 or the 1.x split packages).

ArviZ 0.23 (the last release for Python 3.11) and ArviZ 1.x (Python >= 3.12, built from
``arviz_base``, ``arviz_stats`` and ``arviz_plots``) differ in two things this package uses:

* building the output: ``arviz.from_dict(posterior=..., ...)`` returns an ``InferenceData``;
  ``arviz_base.from_dict({"posterior": ...})`` returns an ``xarray.DataTree``. Both take
  ``(chain, draw, ...)`` arrays, the same ``coords``/``dims`` mappings, and both drop trailing
  dims of ``log_likelihood`` variables that the arrays do not have (``skip_event_dims``);
* PSIS: ``arviz.psislw(log_weights, reff)`` smooths *log weights*; ``arviz_stats``'s
  ``array_stats.psislw(ary, r_eff)`` smooths ``-ary`` (it is written for the log-likelihood of
  PSIS-LOO), so it must be given *negative* log weights.

This module imports neither torch nor pyro, so it can be tested on an interpreter that has
ArviZ 1.x but no torch. ArviZ itself is imported on first use, not with the package: ArviZ 0.23
prints a FutureWarning about its 1.x refactor when imported, which users of the losses alone
should not see.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np


def _arviz_major() -> int:
    try:
        return int(metadata.version("arviz").split(".")[0])
    except metadata.PackageNotFoundError:
        # ArviZ 1.x may be installed as its parts only
        return 1 if importlib.util.find_spec("arviz_base") is not None else 0


ARVIZ_MAJOR = _arviz_major()
"""Major version of the installed ArviZ (0 for 0.23, 1 for the 1.x packages)."""


def from_dict(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    *,
    coords: Mapping[str, Sequence] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    group_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """Build ArviZ's container from ``{group: {variable: array}}``.

    Parameters
    ----------
    groups
        Group name to variables. Sample groups (``posterior``, ``posterior_predictive``,
        ``log_likelihood``, ``sample_stats``) hold ``(chain, draw, ...)`` arrays;
        ``observed_data`` holds the data without sample dims.
    coords
        Dimension name to coordinate values.
    dims
        Variable name to the names of its dims after ``(chain, draw)``.
    attrs
        Attributes of the whole object.
    group_attrs
        Group name to that group's attributes.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        ``InferenceData`` with ArviZ 0.23, ``DataTree`` with ArviZ 1.x.
    """
    groups = {name: dict(data) for name, data in groups.items() if data}
    group_attrs = {name: dict(a) for name, a in (group_attrs or {}).items() if name in groups}
    coords = {name: list(values) for name, values in (coords or {}).items()}
    dims = {name: list(names) for name, names in (dims or {}).items()}
    if ARVIZ_MAJOR >= 1:
        import arviz_base

        all_attrs: dict[str, dict] = {**group_attrs}
        if attrs:
            all_attrs["/"] = dict(attrs)
        return arviz_base.from_dict(groups, coords=coords, dims=dims, attrs=all_attrs)
    import arviz

    extra = {f"{name}_attrs": a for name, a in group_attrs.items()}
    return arviz.from_dict(**groups, coords=coords, dims=dims, attrs=dict(attrs or {}), **extra)


def psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed, self-normalized log importance weights and the Pareto shape k-hat.

    Parameters
    ----------
    log_weights
        ``(..., S)`` log importance ratios, the draws on the **last** axis (independent draws:
        relative efficiency ``r_eff = 1``).

    Returns
    -------
    smoothed : numpy.ndarray
        ``(..., S)`` smoothed log weights, normalized so that ``exp(smoothed).sum(-1) == 1``.
    khat : numpy.ndarray
        ``(...)`` estimated generalized-Pareto shape of the upper tail of the weights.
    """
    log_weights = np.array(log_weights, dtype=np.float64, copy=True)
    if log_weights.ndim == 0 or log_weights.shape[-1] < 2:
        raise ValueError(f"psislw needs at least 2 draws on the last axis, got {log_weights.shape}")
    if ARVIZ_MAJOR >= 1:
        from arviz_stats.base import array_stats

        # arviz_stats smooths -ary (written for PSIS-LOO's log-likelihood): negate the input
        smoothed, khat = array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)
    else:
        import arviz

        smoothed, khat = arviz.psislw(log_weights, reff=1.0)
    return np.asarray(smoothed, dtype=np.float64), np.asarray(khat, dtype=np.float64)


__all__ = ["ARVIZ_MAJOR", "from_dict", "psislw"]
