r"""PSIS-LOO cross-validation for variational fits, corrected for the guide.

``az.loo`` assumes posterior draws. Given draws :math:`z_s \sim q(z)` of a guide instead, its
leave-one-out weights :math:`1 / p(y_i \mid z_s)` target :math:`q(z) / p(y_i \mid z)` rather than
the leave-one-out posterior, and its estimate inherits the guide's error (an under-dispersed
guide looks over-confident). The leave-one-out posterior is reached from the guide by the
importance ratio [1]_ [2]_

.. math::

    \frac{p(z \mid y_{-i})}{q(z)} \propto \frac{p(y, z)}{q(z)\, p(y_i \mid z)},
    \qquad
    \log r_{s,i} = \log p(y, z_s) - \log q(z_s) - \log p(y_i \mid z_s).

Pareto-smoothing :math:`r_{\cdot, i}` for every data point [3]_ gives self-normalized weights
:math:`\tilde w_{s,i}` and

.. math::

    \widehat{\mathrm{elpd}}_i = \log \sum_s \tilde w_{s,i}\, p(y_i \mid z_s),
    \qquad \widehat{\mathrm{elpd}}_{\mathrm{loo}} = \sum_i \widehat{\mathrm{elpd}}_i .

The Pareto shape :math:`\hat k_i` of :math:`r_{\cdot,i}` tells, per point, whether the estimate
can be trusted (below about 0.7), as in ``az.loo``; it now covers both the guide's error and the
point's influence.

References
----------
.. [1] M. Magnusson, M. R. Andersen, J. Jonasson, A. Vehtari, "Bayesian Leave-One-Out
   Cross-Validation for Large Data", ICML 2019.
.. [2] A. Vehtari, A. Gelman, J. Gabry, "Practical Bayesian model evaluation using leave-one-out
   cross-validation and WAIC", Statistics and Computing 27, 2017.
.. [3] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
   Sampling", JMLR 25(72), 2024.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro.poutine as poutine
import torch

from pyro_vi_ext.diagnostics import _arviz_compat
from pyro_vi_ext.diagnostics._sampling import VectorizeParticles
from pyro_vi_ext.diagnostics.arviz_export import to_inference_data
from pyro_vi_ext.diagnostics.importance import khat_threshold

__all__ = ["loo_from_inference_data", "loo_from_log_weights", "vi_loo"]


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.sum(np.exp(values - top), axis=axis)) + np.squeeze(top, axis=axis)


def _linearized_errors(log_weights: np.ndarray, log_values: np.ndarray) -> np.ndarray:
    r"""Per draw and point, the first-order error terms of :math:`\log \sum_s \tilde w_s f_s`.

    ``log_weights`` are normalized over the last axis (draws), ``log_values`` :math:`\log f`
    with the same shape ``[N, S]``. With :math:`\hat\mu = \sum_s \tilde w_s f_s`, the delta
    method gives :math:`\log \hat\mu - \log \mu \approx \sum_s a_s`,
    :math:`a_s = \tilde w_s (f_s - \hat\mu) / \hat\mu`, a sum over independent draws; ``f`` is
    scaled by its maximum first (``a`` does not change).
    """
    weights = np.exp(log_weights)
    scaled = np.exp(log_values - np.max(log_values, axis=-1, keepdims=True))
    estimate = np.sum(weights * scaled, axis=-1, keepdims=True)
    return weights * (scaled - estimate) / estimate


def _elpd_data(entries: dict[str, Any]) -> Any:
    if _arviz_compat.ARVIZ_MAJOR >= 1:
        raise RuntimeError(
            "PSIS-LOO for VI returns ArviZ 0.23's ELPDData; with ArviZ 1.x use "
            "loo_from_log_weights(..., as_dict=True) for the plain values"
        )
    from arviz.stats.stats_utils import ELPDData

    return ELPDData(data=list(entries.values()), index=list(entries.keys()))


def loo_from_log_weights(
    log_likelihood: Any,
    log_weights: Any,
    *,
    as_dict: bool = False,
    warn: bool = True,
) -> Any:
    r"""PSIS-LOO of guide draws from their log-likelihoods and log importance weights.

    With :math:`\log r_{s,i} = \log w_s - \log p(y_i \mid z_s)`, Pareto-smoothed over ``s`` for
    every point ``i`` into normalized weights :math:`\tilde w_{s,i}`:

    .. math::

        \mathrm{elpd}_i = \log \sum_s \tilde w_{s,i}\, p(y_i \mid z_s), \qquad
        \mathrm{lppd}_i = \log \sum_s \tilde v_{s}\, p(y_i \mid z_s), \qquad
        p_{\mathrm{loo}} = \sum_i (\mathrm{lppd}_i - \mathrm{elpd}_i),

    with :math:`\tilde v` the smoothed weights :math:`w` themselves (the guide corrected to the
    full-data posterior). The standard error is ArviZ's :math:`\sqrt{N \operatorname{var}_i
    \mathrm{elpd}_i}` (spread over data points). The Monte Carlo error of
    :math:`\mathrm{elpd}_{\mathrm{loo}}` is the delta method over draws: with
    :math:`a_{s,i} = \tilde w_{s,i} (p(y_i \mid z_s) - \hat\mu_i) / \hat\mu_i` and
    :math:`\hat\mu_i = \exp \mathrm{elpd}_i`, :math:`\sqrt{\sum_s (\sum_i a_{s,i})^2}` for
    whole-trace weights (the points share the draws) and :math:`\sqrt{\sum_{s,i} a_{s,i}^2}`
    for per-point weights.

    Parameters
    ----------
    log_likelihood
        ``[S, N]`` :math:`\log p(y_i \mid z_s)` of ``S`` guide draws and ``N`` data points.
    log_weights
        ``[S]`` :math:`\log p(y, z_s) - \log q(z_s)` (whole-trace weights) or ``[S, N]`` per-point
        weights (when every latent is local to its data point).
    as_dict
        Return a plain ``dict`` instead of ArviZ's ``ELPDData``.
    warn
        Warn when some point's k-hat exceeds :func:`khat_threshold`.

    Returns
    -------
    arviz.stats.stats_utils.ELPDData or dict
        ``elpd_loo``, ``se``, ``p_loo``, ``n_samples``, ``n_data_points``, ``warning``,
        ``loo_i`` (``[N]``), ``pareto_k`` (``[N]``), ``scale`` (``"log"``), ``good_k``, and
        ``mcse_elpd_loo`` and ``guide_pareto_k`` (the largest k-hat of the weights :math:`w`,
        the guide as a proposal for the posterior). ``az.compare`` accepts the ``ELPDData``.

    Raises
    ------
    ValueError
        For arrays of the wrong shape, fewer than 2 draws, or NaN / ``+inf`` values.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> log_lik = rng.normal(-1.0, 0.1, size=(2000, 5))
    >>> result = loo_from_log_weights(log_lik, np.zeros(2000), as_dict=True)
    >>> bool(abs(result["elpd_loo"] - (-5.0)) < 0.2)
    True
    """
    log_lik = np.asarray(log_likelihood, dtype=np.float64)
    log_w = np.asarray(log_weights, dtype=np.float64)
    if log_lik.ndim != 2 or log_lik.shape[0] < 2:
        raise ValueError(f"log_likelihood must be [S, N] with S >= 2 draws, got {log_lik.shape}")
    num_samples, num_points = log_lik.shape
    if log_w.ndim == 1:
        log_w = log_w[:, None]
    if log_w.shape not in ((num_samples, 1), (num_samples, num_points)):
        raise ValueError(
            f"log_weights must be [S] or [S, N] = [{num_samples}] or [{num_samples}, "
            f"{num_points}] to match log_likelihood, got {np.asarray(log_weights).shape}"
        )
    for label, array in (("log_likelihood", log_lik), ("log_weights", log_w)):
        if np.isnan(array).any() or np.isposinf(array).any():
            raise ValueError(f"{label} contains NaN or +inf")
    loo_ratios = (log_w - log_lik).T  # [N, S]
    smoothed, pareto_k = _arviz_compat.psislw(loo_ratios)
    loo_i = _logsumexp(smoothed + log_lik.T, axis=-1)
    full, guide_k = _arviz_compat.psislw(log_w.T)  # [1 or N, S]
    lppd_i = _logsumexp(full + log_lik.T, axis=-1)
    errors = _linearized_errors(smoothed, log_lik.T)  # [N, S]
    if log_w.shape[1] == 1:
        # whole-trace weights: every point reuses the same draws, so the points' errors are
        # correlated: sum them per draw before squaring
        mcse = float(np.sqrt(np.sum(np.square(errors.sum(0)))))
    else:
        mcse = float(np.sqrt(np.sum(np.square(errors))))
    good_k = khat_threshold(num_samples)
    flagged = int(np.sum(pareto_k > good_k))
    if flagged and warn:
        warnings.warn(
            f"PSIS-LOO: {flagged} of {num_points} data points have k-hat above {good_k:.2f}; "
            "their leave-one-out estimates are unreliable. Use more guide draws, a guide closer "
            "to the posterior, or refit without those points (K-fold).",
            UserWarning,
            stacklevel=2,
        )
    entries = {
        "elpd_loo": float(loo_i.sum()),
        "se": float(np.sqrt(num_points * np.var(loo_i))),
        "p_loo": float(np.sum(lppd_i - loo_i)),
        "n_samples": int(num_samples),
        "n_data_points": int(num_points),
        "warning": bool(flagged),
        "loo_i": loo_i,
        "pareto_k": np.asarray(pareto_k, dtype=np.float64),
        "scale": "log",
        "good_k": float(good_k),
        "mcse_elpd_loo": mcse,
        "guide_pareto_k": float(np.max(guide_k)),
    }
    return entries if as_dict else _elpd_data(entries)


def _group(idata: Any, name: str) -> Any:
    """Return a group of an ``InferenceData`` (a child of a ``DataTree``), or ``None``."""
    try:
        return idata[name]
    except (KeyError, AttributeError, TypeError):
        return None


def _sample_stacked(array: Any, point_dims: list[str]) -> np.ndarray:
    """``(chain, draw, *point_dims)`` DataArray to ``[S, N]``."""
    values = array.transpose("chain", "draw", *point_dims).values
    return values.reshape(values.shape[0] * values.shape[1], -1)


def loo_from_inference_data(idata: Any, var_name: str | None = None, *, warn: bool = True) -> Any:
    r"""PSIS-LOO corrected for the guide, from an export of :func:`to_inference_data`.

    Reads ``log_likelihood[var_name]`` and the log importance weights of ``sample_stats``
    (``log_weight_pointwise`` when the weights factorize over data points, else ``log_weight``)
    and applies :func:`loo_from_log_weights`.

    Parameters
    ----------
    idata
        An export of raw guide draws (``resample=False``): importance-resampled draws are no
        longer draws of the guide, so their weights do not apply.
    var_name
        The observed site; may be omitted when the export has one.
    warn
        Warn about points with high k-hat.

    Returns
    -------
    arviz.stats.stats_utils.ELPDData
        As :func:`loo_from_log_weights`, with ``loo_i`` and ``pareto_k`` as ``DataArray`` over
        the site's dims and coordinates.

    Raises
    ------
    ValueError
        When ``idata`` is not a raw-guide export of this package, ``var_name`` is missing or
        ambiguous, or the weights' data dims are not among the site's dims.

    Examples
    --------
    ::

        idata = to_inference_data(model, guide, x, y, num_samples=4000)
        loo = loo_from_inference_data(idata)
        loo["elpd_loo"], loo["se"], loo["pareto_k"].max()
    """
    import xarray as xr

    posterior, stats = _group(idata, "posterior"), _group(idata, "sample_stats")
    attrs = dict(posterior.attrs) if posterior is not None else {}
    if attrs.get("creation_library") != "pyro_vi_ext" or stats is None:
        raise ValueError(
            "loo_from_inference_data needs an export of pyro_vi_ext.diagnostics."
            "to_inference_data (its sample_stats hold the importance weights); for MCMC draws "
            "use az.loo"
        )
    if attrs.get("draws") != "guide":
        raise ValueError(
            f"the export holds {attrs.get('draws')!r} draws; PSIS-LOO for VI needs raw guide "
            "draws: export with resample=False"
        )
    log_lik_group = _group(idata, "log_likelihood")
    if log_lik_group is None:
        raise ValueError("the export has no log_likelihood group: the model has no observed site")
    names = list(log_lik_group.data_vars)
    if var_name is None:
        if len(names) != 1:
            raise ValueError(f"the export has observed sites {names}: pass var_name=")
        var_name = names[0]
    if var_name not in names:
        raise ValueError(f"no observed site {var_name!r} in log_likelihood; sites: {names}")
    log_lik = log_lik_group[var_name]
    point_dims = [d for d in log_lik.dims if d not in ("chain", "draw")]
    weight_name = "log_weight_pointwise" if "log_weight_pointwise" in stats.data_vars else None
    log_w = stats[weight_name or "log_weight"]
    extra = [d for d in log_w.dims if d not in log_lik.dims]
    if extra:
        raise ValueError(
            f"the per-point weights have dims {extra} that site {var_name!r} (dims "
            f"{point_dims}) lacks; PSIS-LOO needs the site's data points to carry the weights"
        )
    if weight_name:
        weights = _sample_stacked(xr.broadcast(log_w, log_lik)[0], point_dims)
    else:
        weights = log_w.transpose("chain", "draw").values.reshape(-1)
    entries = loo_from_log_weights(
        _sample_stacked(log_lik, point_dims), weights, as_dict=True, warn=warn
    )
    shape = [log_lik.sizes[d] for d in point_dims]
    coords = {d: log_lik.coords[d].values for d in point_dims if d in log_lik.coords}
    for key in ("loo_i", "pareto_k"):
        entries[key] = xr.DataArray(
            entries[key].reshape(shape), dims=point_dims, coords=coords, name=key
        )
    return _elpd_data(entries)


def vi_loo(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 4000,
    var_name: str | None = None,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    warn: bool = True,
    **kwargs,
) -> Any:
    r"""PSIS-LOO of a model fitted by a guide, with the guide's error corrected.

    Draws ``num_samples`` latents from the guide, evaluates the model's pointwise
    log-likelihood and the importance weights :math:`p(y, z_s) / q(z_s)`, and estimates
    :math:`\sum_i \log p(y_i \mid y_{-i})` with the leave-one-out ratios
    :math:`r_{s,i} = p(y, z_s) / (q(z_s)\, p(y_i \mid z_s))` Pareto-smoothed per point (see
    :mod:`pyro_vi_ext.diagnostics.loo`) [1]_. Plain ``az.loo`` on the same draws treats them
    as posterior draws and is off by the guide's error.

    Parameters
    ----------
    model, guide
        Pyro model and fitted guide, called with ``*args, **kwargs`` (the full data: the
        posterior needs every point, so no subsampling plate may be active).
    *args
        The model's positional arguments.
    num_samples
        Number ``S`` of guide draws.
    var_name
        The observed site to cross-validate; may be omitted when the model has one.
    chunk_size, max_plate_nesting, vectorize_particles
        As in :func:`to_inference_data`.
    warn
        Warn about points with high k-hat.
    **kwargs
        The model's keyword arguments.

    Returns
    -------
    arviz.stats.stats_utils.ELPDData
        ``elpd_loo``, ``se``, ``p_loo``, ``loo_i``, ``pareto_k``, ``good_k``, ``warning``, and
        ``mcse_elpd_loo`` (Monte Carlo error of ``elpd_loo``) and ``guide_pareto_k`` (k-hat of
        the guide as a proposal for the whole posterior). ``az.compare`` accepts it.

    Raises
    ------
    ValueError
        When a plate subsamples the data, or as :func:`loo_from_inference_data`.

    References
    ----------
    .. [1] M. Magnusson, M. R. Andersen, J. Jonasson, A. Vehtari, "Bayesian Leave-One-Out
       Cross-Validation for Large Data", ICML 2019.

    Examples
    --------
    ::

        loo = vi_loo(model, guide, x, y, num_samples=4000)
        print(loo)                              # ArviZ's table, k-hat counts included
        az.compare({"vi": loo, "other": other_loo})
    """
    _check_full_data(model, guide, args, kwargs)
    idata = to_inference_data(
        model,
        guide,
        *args,
        num_samples=num_samples,
        posterior_predictive=False,
        chunk_size=chunk_size,
        max_plate_nesting=max_plate_nesting,
        vectorize_particles=vectorize_particles,
        **kwargs,
    )
    return loo_from_inference_data(idata, var_name, warn=warn)


def _check_full_data(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
    """Raise if a plate of the model subsamples its data (one guide run, one replayed model)."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            full = frame.full_size
            if frame.vectorized and full is not None and frame.size != full:
                raise ValueError(
                    f"plate {frame.name!r} subsamples {frame.size} of {full} data points; "
                    "PSIS-LOO needs the posterior given every point: call vi_loo on the full "
                    "data (no subsample_size, no idx/n_data)"
                )
