r"""Export a fitted guide to ArviZ: posterior, predictive, log-likelihood, data and weights.

Pyro's ``arviz.from_pyro`` converts MCMC runs only. :func:`to_inference_data` builds the same
object from a model, a guide and the data, so that the ArviZ toolbox (``az.summary``,
``az.plot_posterior``, ``az.plot_ppc``, ``az.loo``, netCDF files) applies to variational
inference, and adds the importance weights that diagnose the guide [1]_.

References
----------
.. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
   Inference", ICML 2018.
.. [2] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import pyro

from pyro_vi_ext.diagnostics import _arviz_compat
from pyro_vi_ext.diagnostics._sampling import (
    SiteDraws,
    VectorizeParticles,
    check_counts,
    collect_draws,
    predictive,
    prepare,
)
from pyro_vi_ext.diagnostics.importance import psis_from_log_weights, resampled_draws

READING_R_HAT = (
    "draws are independent (no Markov chain): r_hat and ess_* over chains carry no "
    "information on the fit; read az.summary(idata, kind='stats') and the PSIS k-hat and "
    "ESS in the attributes psis_khat and psis_ess"
)
"""The ``r_hat_note`` attribute of every export: how to read ``r_hat`` of VI draws."""


def _package_version() -> str:
    try:
        return metadata.version("pyro-vi-ext")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _attr_value(value: Any) -> Any:
    """Make an attribute value storable: netCDF takes str and numbers, not bool or None."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | float | str | np.integer | np.floating):
        return value
    return str(value)


def _loss_attrs(loss: Any) -> dict[str, Any]:
    if loss is None:
        return {"loss": "unspecified", "estimator": "unspecified"}
    if isinstance(loss, str):
        return {"loss": loss, "estimator": "unspecified"}
    attrs = {
        "loss": type(loss).__name__,
        "estimator": str(getattr(loss, "estimator", "pyro default")),
    }
    for name in ("num_particles", "num_outer", "variant", "ciwae_beta"):
        value = getattr(loss, name, None)
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            attrs[f"loss_{name}"] = value
    return attrs


def _callable_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _apply_user_dims(
    auto_dims: dict[str, list[str]],
    user_dims: Mapping[str, Sequence[str]] | None,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Replace the automatic dim names of the variables named in ``user_dims``.

    Returns the dims of every variable and the renames ``{automatic name: user name}`` of the
    dims whose name changed (used to carry a plate's coordinates to its new name).
    """
    resolved = {name: list(names) for name, names in auto_dims.items()}
    renames: dict[str, str] = {}
    for name, names in (user_dims or {}).items():
        if isinstance(names, str):
            raise TypeError(
                f"dims[{name!r}] must be a sequence of dim names, not the string {names!r}"
            )
        if name not in resolved:
            raise ValueError(
                f"dims names variable {name!r}, which the export does not have; exported "
                f"variables: {sorted(resolved)}"
            )
        names = [str(n) for n in names]
        if len(names) != len(resolved[name]):
            raise ValueError(
                f"dims[{name!r}] gives {len(names)} names {names} but {name!r} has "
                f"{len(resolved[name])} dims after (chain, draw): {resolved[name]}"
            )
        for old, new in zip(resolved[name], names, strict=True):
            if old != new:
                renames.setdefault(old, new)
        resolved[name] = names
    return resolved, renames


def _dim_sizes(
    groups: Mapping[str, Mapping[str, np.ndarray]], dims: Mapping[str, Sequence[str]]
) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for group, variables in groups.items():
        offset = 0 if group == "observed_data" else 2
        for name, array in variables.items():
            for dim, size in zip(dims.get(name, ()), array.shape[offset:], strict=False):
                sizes.setdefault(dim, int(size))
    return sizes


def _resolve_coords(
    plate_coords: dict[str, list],
    renames: Mapping[str, str],
    user_coords: Mapping[str, Sequence] | None,
    sizes: Mapping[str, int],
) -> dict[str, list]:
    coords = {}
    for dim, values in plate_coords.items():
        coords[dim] = values
        if dim in renames:
            coords[renames[dim]] = values  # a renamed plate keeps its data indices
    for dim, values in (user_coords or {}).items():
        values = list(values)
        if dim not in sizes:
            raise ValueError(
                f"coords names dim {dim!r}, which no exported variable has; dims: {sorted(sizes)}"
            )
        if len(values) != sizes[dim]:
            raise ValueError(
                f"coords[{dim!r}] has {len(values)} values but dim {dim!r} has size {sizes[dim]}"
            )
        coords[dim] = values
    return {dim: values for dim, values in coords.items() if dim in sizes}


def _psis_attrs(log_weights: np.ndarray) -> dict[str, float]:
    """Worst-point PSIS k-hat and ESS of guide draws, or empty when PSIS cannot run."""
    if log_weights.shape[0] < 2 or np.isnan(log_weights).any() or np.isposinf(log_weights).any():
        return {}
    if not np.isfinite(log_weights).any(0).all():  # a point where every draw has zero weight
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's small-sample notes; the value says enough
        result = psis_from_log_weights(log_weights)
    return {"psis_khat": float(np.max(result.khat)), "psis_ess": float(np.min(result.psis_ess))}


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    num_chains: int = 1,
    resample: bool = False,
    num_proposals: int | None = None,
    smooth: bool = False,
    posterior_predictive: bool = True,
    loss: Any = None,
    attrs: Mapping[str, Any] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    chunk_size: int = 1000,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    **kwargs,
):
    r"""Draw from a guide and export model, guide and data to an ArviZ ``InferenceData``.

    ``num_samples`` draws :math:`z_s \sim q(z \mid x)` are pushed through the model in blocks of
    ``chunk_size`` under ``torch.no_grad`` and stored with ArviZ's conventions, so that
    ``az.summary``, ``az.plot_posterior``, ``az.plot_ppc``, ``az.loo`` and netCDF files work on a
    variational fit as on an MCMC run [1]_. The draws are independent, so ``r_hat`` means nothing
    here: summarize with ``az.summary(idata, kind="stats")`` and judge the guide by the PSIS
    k-hat and ESS recorded in the attributes (see Notes).

    Parameters
    ----------
    model, guide
        Pyro model and guide, called with ``*args, **kwargs`` (the data).
    *args
        The model's positional arguments (the data).
    num_samples
        Number of posterior draws exported.
    num_chains
        Pseudo-chains to split the independent draws into (see Notes); must divide
        ``num_samples``. Keep the default 1 unless an ArviZ function insists on several chains.
    resample
        Export importance-resampled draws instead of raw guide draws (see Notes).
    num_proposals
        Guide draws to resample from when ``resample`` (default ``4 * num_samples``).
    smooth
        Resample with Pareto-smoothed weights.
    posterior_predictive
        Whether to sample the ``posterior_predictive`` group (one more model run per block).
    loss
        The training loss (a Pyro ELBO object or a name), recorded in the attributes ``loss``,
        ``estimator`` (its ``estimator`` attribute, e.g. ``"dreg"``; ``"pyro default"`` for
        Pyro's own ELBOs) and ``loss_num_particles`` (and ``num_outer``, ``variant`` when set).
    attrs
        Extra attributes (str or numbers) for the whole object and the ``posterior`` group.
    coords
        Dim name to coordinate values, as in ``az.from_pyro``: applied to every group that has
        the dim (overriding the data indices of a plate dim).
    dims
        Variable name to the names of its dims after ``(chain, draw)``, as in ``az.from_pyro``:
        a site's names apply in every group that holds it (``posterior``,
        ``posterior_predictive``, ``log_likelihood``, ``observed_data``). Renaming a plate dim
        keeps the plate's data indices as coordinates of the new name.
    chunk_size
        Draws per block (per vectorized run).
    max_plate_nesting
        The model's plate nesting (guessed by one run when omitted).
    vectorize_particles
        ``True``: each block of ``chunk_size`` draws is one run on a particle plate (the model
        must broadcast over a leftmost dim); ``False``: one model and guide run per draw, for
        models that do not broadcast (as Pyro's ``Predictive``); ``"auto"`` (default;
        the posterior predictive takes the same path):
        vectorized unless one small vectorized run raises
        :class:`~pyro_vi_ext.infer._weights.ParticleVectorizationError`, then sequential with a
        :class:`~pyro_vi_ext.diagnostics.ParticleFallbackWarning`. Same results on the same
        draws either way.
    **kwargs
        The model's keyword arguments.

    Returns
    -------
    arviz.InferenceData
        (an ``xarray.DataTree`` under ArviZ 1.x) with the groups below. The same attributes
        are set on the object, ``posterior`` and ``sample_stats``.

    Raises
    ------
    ValueError
        For counts that are not positive ints, ``num_samples`` not a multiple of ``num_chains``,
        or ``coords``/``dims`` naming a dim or variable the export lacks or of the wrong length.

    Notes
    -----
    Groups:

    ``posterior``
        Guide draws of every latent site of the model (plus ``pyro.deterministic`` sites), as
        ``(chain, draw, ...)``. Dims are named after the site's plates (a latent ``theta`` in
        ``pyro.plate("school", 8)`` has dims ``("chain", "draw", "school")``), other dims
        ``"{site}_dim_{k}"``; Pyro's broadcasting singleton dims are removed, so a global
        ``[D]`` latent is ``("chain", "draw", "w_dim_0")``. Plate coordinates are the data
        indices the plate used (``0..N-1`` for a full plate, the minibatch for a subsampled
        one: one minibatch is drawn and kept for the whole export).
    ``posterior_predictive``
        Every observed site sampled afresh from the model given each posterior draw (as
        :func:`pyro.poutine.uncondition` does, deterministic sites kept); same dims as
        ``observed_data``.
    ``log_likelihood``
        Per observed site and per element of its plates, :math:`\log p(x_n \mid z_s)` (event
        dims summed, masks applied, float64): what ``az.loo`` and ``az.waic`` read. For LOO of
        a variational fit use :func:`pyro_vi_ext.diagnostics.vi_loo` or
        :func:`~pyro_vi_ext.diagnostics.loo_from_inference_data`, which correct for the guide.
    ``observed_data``
        The observations, broadcast to their site's batch shape.
    ``sample_stats``
        Per draw: ``lp`` :math:`= \log p(x, z_s)`, ``log_q`` :math:`= \log q(z_s \mid x)` and
        ``log_weight`` :math:`= \log p(x, z_s) - \log q(z_s \mid x)`, summed over the evaluated
        data points (no subsampling factor). When the weights factorize over data points (every
        latent in the data plates), also ``log_weight_pointwise`` with the plates' dims.

    Attributes that say what the draws are: ``inference_library`` (``"pyro"``),
    ``creation_library`` (``"pyro_vi_ext"``), ``inference_method``
    (``"variational inference"``), ``sampler`` (``"variational guide"`` or
    ``"importance resampling of variational guide draws"``), ``draws`` (``"guide"`` or
    ``"importance_resampled"``), ``draws_are_independent`` (1), ``r_hat_note``
    (:data:`READING_R_HAT`), and ``psis_khat``, ``psis_ess``: the largest k-hat and the smallest
    PSIS effective sample size over the data points of the guide draws as an importance proposal
    (of the exported draws, or of the proposals they were resampled from) [3]_.

    Reading ``r_hat`` and ESS: guide draws are independent, so chains carry no convergence
    information. ``num_chains > 1`` splits the draws into that many *pseudo-chains* only so that
    ArviZ functions expecting several chains run; ``r_hat`` is then near 1 by construction
    (with one chain it is NaN) and ``ess_bulk`` near the number of draws whatever the quality of
    the guide. Summarize with ``az.summary(idata, kind="stats")``; the effective sample size
    that tells how well the draws stand for the posterior is ``psis_ess`` (and ``psis_khat``
    whether to trust it: below 0.7).

    Resampling (the honest variant): with ``resample=True`` the posterior is the
    importance-resampled one (:func:`~pyro_vi_ext.diagnostics.importance_resample`, the IW
    posterior of Domke & Sheldon [2]_); the ``posterior``, ``log_likelihood`` and
    ``sample_stats`` rows are those of the chosen proposal draws (per data point for local
    latents), and ``posterior_predictive`` is sampled given them. Draws are resampled with
    replacement, so they repeat: ArviZ's ``ess_*`` overstates their information, which is
    ``psis_ess`` (out of ``num_proposals``).

    References
    ----------
    .. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating
       Variational Inference", ICML 2018.
    .. [2] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
    .. [3] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
       Sampling", JMLR 25(72), 2024.

    Examples
    --------
    ::

        import arviz as az
        idata = to_inference_data(model, guide, X, y, num_samples=2000, loss=svi.loss,
                                  dims={"y": ["obs"]}, coords={"w_dim_0": ["a", "b", "c"]})
        az.summary(idata, var_names=["w"], kind="stats")   # r_hat means nothing for VI
        idata.posterior.attrs["psis_khat"]                 # below 0.7: the guide is usable
        az.plot_ppc(idata)
        vi_loo(model, guide, X, y)                         # PSIS-LOO corrected for the guide
        idata.to_netcdf("fit.nc")                          # az.from_netcdf("fit.nc") reloads it
    """
    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
        raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
    check_counts(num_samples, chunk_size)
    if num_samples % num_chains:
        raise ValueError(f"num_samples={num_samples} must be a multiple of num_chains={num_chains}")
    if resample:
        result = resampled_draws(
            model,
            guide,
            args,
            kwargs,
            num_samples=num_samples,
            num_proposals=num_proposals,
            smooth=smooth,
            chunk_size=chunk_size,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        setup, draws, arrays = result.setup, result.draws, result.arrays
        log_p, log_q = result.log_p, result.log_q
        num_proposals = result.num_proposals
        psis_attrs = {
            "psis_khat": float(np.max(result.psis.khat)),
            "psis_ess": float(np.min(result.psis.psis_ess)),
        }
    else:
        setup = prepare(model, guide, args, kwargs, max_plate_nesting, vectorize_particles)
        draws = collect_draws(setup, num_samples, chunk_size)
        arrays = {
            name: site.array
            for group in (draws.latents, draws.deterministic, draws.log_likelihood)
            for name, site in group.items()
        }
        log_p, log_q = draws.log_p, draws.log_q
        psis_attrs = _psis_attrs(log_p - log_q)

    predicted: dict[str, SiteDraws] = {}
    if posterior_predictive and draws.observed:
        latent_values = {name: arrays[name] for name in draws.latents}
        total = int(log_p.shape[0])
        predicted = predictive(setup, draws.latents, latent_values, total, chunk_size)

    nesting = draws.nesting

    def export(site: SiteDraws, array: np.ndarray) -> tuple[np.ndarray, list[str]]:
        _, site_dims = site.layout(nesting)
        squeezed = site.squeezed(nesting, array)
        chained = squeezed.reshape((num_chains, -1, *squeezed.shape[1:]))
        return chained, site_dims

    groups: dict[str, dict[str, np.ndarray]] = {
        "posterior": {},
        "posterior_predictive": {},
        "log_likelihood": {},
        "observed_data": {},
        "sample_stats": {},
    }
    auto_dims: dict[str, list[str]] = {}
    for group in (draws.latents, draws.deterministic):
        for name, site in group.items():
            groups["posterior"][name], auto_dims[name] = export(site, arrays[name])
    for name, site in draws.observed.items():
        _, site_dims = site.layout(nesting)
        groups["observed_data"][name] = site.squeezed(nesting)[0]
        auto_dims[name] = site_dims
    for name, site in draws.log_likelihood.items():
        # float64: ArviZ's PSIS keeps the input dtype, and in float32 its Pareto fit breaks down
        # (az.loo returns NaN) on log-likelihoods that vary little between draws
        chained, _ = export(site, arrays[name])
        groups["log_likelihood"][name] = chained.astype(np.float64)
    for name, site in predicted.items():
        groups["posterior_predictive"][name], _ = export(site, site.array)
    for stat, value in (("lp", log_p), ("log_q", log_q), ("log_weight", log_p - log_q)):
        groups["sample_stats"][stat] = value.sum(-1).reshape(num_chains, -1)
    all_dims, renames = _apply_user_dims(auto_dims, dims)
    if draws.point_plates:
        shape = tuple(p.size for p in draws.point_plates)
        pointwise = (log_p - log_q).reshape((num_chains, -1, *shape))
        groups["sample_stats"]["log_weight_pointwise"] = pointwise
        all_dims["log_weight_pointwise"] = [renames.get(p.name, p.name) for p in draws.point_plates]

    plate_coords: dict[str, list] = {}
    for plate, size in draws.plate_sizes.items():
        indices = setup.subsample_indices.get(plate)
        values = indices.tolist() if indices is not None and len(indices) == size else range(size)
        plate_coords[plate] = list(values)
    all_coords = _resolve_coords(plate_coords, renames, coords, _dim_sizes(groups, all_dims))

    meta = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "creation_library": "pyro_vi_ext",
        "creation_library_version": _package_version(),
        "inference_method": "variational inference",
        "sampler": (
            "importance resampling of variational guide draws" if resample else "variational guide"
        ),
        "guide": _callable_name(guide),
        "draws": "importance_resampled" if resample else "guide",
        "draws_are_independent": True,
        "r_hat_note": READING_R_HAT,
        "num_samples": int(num_samples),
        "num_chains": int(num_chains),
        **psis_attrs,
        **_loss_attrs(loss),
    }
    if resample:
        meta["num_proposals"] = int(num_proposals)
        meta["resampling_weights"] = "psis_smoothed" if smooth else "raw"
    meta.update({str(k): _attr_value(v) for k, v in (attrs or {}).items()})
    meta = {k: _attr_value(v) for k, v in meta.items()}
    return _arviz_compat.from_dict(
        groups,
        coords=all_coords,
        dims=all_dims,
        attrs=meta,
        group_attrs={"posterior": meta, "sample_stats": meta},
    )


__all__ = ["READING_R_HAT", "to_inference_data"]
