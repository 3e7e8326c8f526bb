r"""The code of the decomposed ELBO: which guide sites form it, and its per-point densities.

Vocabulary
----------
* The *data plate* is the plate over data points :math:`n`; the *code* is the concatenation of
  the guide's latent sites inside it (:math:`D` scalars per point), named by the user's (model)
  site names.
* A :class:`CodeSource` says where a code site's density :math:`q(z \mid x_n)` is read in the
  guide trace: the site itself, or, for an autoguide that samples an unconstrained value and
  then a ``Delta`` at the user's site, the unconstrained sample with the ``Delta``'s
  log-Jacobian. :class:`~pyro.infer.autoguide.AutoNormal` samples ``<site>_unconstrained``;
  :class:`~pyro.infer.autoguide.AutoDiagonalNormal` samples one packed latent vector that is
  unpacked per site.
* A :class:`CodeBlock` holds one code site of one traced batch of :math:`B` points in a canonical
  layout: ``values`` is ``[S, B, D_site]`` (particles, points, flattened per-point dims), and the
  site's distribution evaluates :math:`\log q(z_i \mid x_j)` for rows :math:`z_i` against every
  column :math:`j`.
* Per-dimension marginals :math:`q(z_{i,d} \mid x_j)` need a factorized guide (an
  ``Independent`` of a univariate family) or a Gaussian with known 1-D marginals
  (``MultivariateNormal``, ``LowRankMultivariateNormal``: :math:`\mathcal N(m_d,
  \sqrt{\Sigma_{dd}})`).

An elementwise bijection :math:`z = T(u)` changes every log-density of the code by the same
:math:`\log |\partial u / \partial z|` at the sample, whichever point :math:`x_j` it is evaluated
under, so the aggregate terms are computed on :math:`u` and the log-Jacobian is added back: the
index-code MI and the total correlation do not change, the dimension-wise KL compares with
:math:`p(z)` in the user's space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import IndependentTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine import Trace
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    biject_to,
)

from pyro_vi_ext.infer._weights import (
    PointPlate,
    _reduce_to_points,
    common_user_scale,
    latent_sites,
    sample_sites,
    site_plate_frames,
    site_user_scale,
)


@dataclass(frozen=True)
class CodeLayout:
    """Where the code lives: the data plate and the guide sites that form the code.

    Attributes
    ----------
    data_plate : PointPlate
        The plate over data points, with its batch size ``B`` and full size ``N``.
    code_sites : tuple of str
        The user's names of the code sites, in trace order.
    """

    data_plate: PointPlate
    code_sites: tuple[str, ...]

    @property
    def plate(self) -> str:
        """Name of the data plate."""
        return self.data_plate.name

    @property
    def dim(self) -> int:
        """Negative batch dim of the data plate."""
        return self.data_plate.dim

    @property
    def size(self) -> int:
        """Batch size ``B`` of the data plate."""
        return self.data_plate.size

    @property
    def full_size(self) -> int:
        """Full size ``N`` the data plate declares."""
        return self.data_plate.full_size

    @property
    def subsampled(self) -> bool:
        """Whether the data plate is subsampled (its subsampling factor is not 1)."""
        return self.data_plate.subsample_factor != 1.0


def _as_point_plate(frame) -> PointPlate:
    full = frame.full_size if frame.full_size is not None else frame.size
    return PointPlate(
        name=frame.name, dim=int(frame.dim), size=int(frame.size), full_size=int(full)
    )


def _is_auxiliary(site: dict) -> bool:
    return bool(site["infer"].get("is_auxiliary", False))


def find_code_layout(
    model_trace: Trace | None,
    guide_trace: Trace,
    data_plate: str | None = None,
    code_sites: Sequence[str] | None = None,
) -> CodeLayout:
    """Find the data plate and the code sites of a (pruned) model/guide trace pair.

    The data plate is ``data_plate`` when given; otherwise the subsampled plate holding guide
    latents, or, with no subsampling, the only plate holding guide latents (when several do, the
    one shared by every sample site). The code is ``code_sites`` when given, otherwise every guide
    latent site inside the data plate, in trace order, except an autoguide's auxiliary sites
    (``infer={"is_auxiliary": True}``), which serve the user's sites they stand for.

    Parameters
    ----------
    model_trace : pyro.poutine.Trace or None
        The model's trace; ``None`` checks the guide only.
    guide_trace : pyro.poutine.Trace
        The guide's trace, subsample sites pruned.
    data_plate : str, optional
        Name of the plate over data points.
    code_sites : sequence of str, optional
        Names of the guide sites that form the code.

    Returns
    -------
    CodeLayout

    Raises
    ------
    ValueError
        Naming the plate or site when no data plate or no code can be found, or a code site is
        not a latent inside the data plate of both the guide and the model.
    """
    guide_latents = dict(latent_sites(guide_trace))
    user_latents = {name: site for name, site in guide_latents.items() if not _is_auxiliary(site)}
    traces = (guide_trace,) if model_trace is None else (model_trace, guide_trace)
    frames: dict[str, object] = {}
    for trace in traces:
        for _, site in sample_sites(trace):
            frames.update(site_plate_frames(site))

    if data_plate is not None:
        if data_plate not in frames:
            raise ValueError(
                f"data_plate='{data_plate}' is not a vectorized plate of the model or guide; "
                f"plates found: {sorted(frames) or 'none'}"
            )
        plate = data_plate
    else:
        with_latents: dict[str, object] = {}
        for site in user_latents.values():
            with_latents.update(site_plate_frames(site))
        subsampled = [
            name
            for name, frame in with_latents.items()
            if _as_point_plate(frame).subsample_factor != 1.0
        ]
        if len(subsampled) == 1:
            plate = subsampled[0]
        elif len(subsampled) > 1:
            raise ValueError(
                f"Several subsampled plates hold guide latents ({', '.join(sorted(subsampled))}); "
                "pass data_plate= to name the plate over data points."
            )
        elif len(with_latents) == 1:
            plate = next(iter(with_latents))
        elif not with_latents:
            names = ", ".join(f"'{n}'" for n in guide_latents) or "none"
            raise ValueError(
                "No code site found: no guide latent site lies inside a plate (guide latents: "
                f"{names}). The decomposed ELBO needs per-data-point latents sampled inside the "
                "data plate, e.g. `with pyro.plate('data', N, subsample=idx): pyro.sample('z', "
                "dist.Normal(loc, scale).to_event(1))` in the guide."
            )
        else:
            shared = [
                name
                for name in with_latents
                if all(
                    name in site_plate_frames(site)
                    for trace in traces
                    for _, site in sample_sites(trace)
                )
            ]
            if len(shared) != 1:
                raise ValueError(
                    "Cannot tell which plate is the data plate: guide latents lie in plates "
                    f"{', '.join(sorted(with_latents))}. Pass data_plate= (and code_sites= if "
                    "needed)."
                )
            plate = shared[0]

    if code_sites is not None:
        if isinstance(code_sites, str):
            code_sites = (code_sites,)
        names = tuple(code_sites)
        if not names:
            raise ValueError("code_sites is empty; name at least one guide latent site")
        for name in names:
            if name not in guide_latents:
                raise ValueError(
                    f"code site '{name}' is not a latent sample site of the guide; guide latents: "
                    f"{', '.join(guide_latents) or 'none'}"
                )
            if plate not in site_plate_frames(guide_latents[name]):
                raise ValueError(
                    f"code site '{name}' lies outside the data plate '{plate}'; the code must be "
                    "per data point (sampled inside the data plate)."
                )
    else:
        names = tuple(n for n, s in user_latents.items() if plate in site_plate_frames(s))
        if not names:
            raise ValueError(
                f"No code site found: the guide samples no latent inside the data plate '{plate}'. "
                "The decomposed ELBO needs per-data-point latents (an encoder) in that plate."
            )
    for name in names if model_trace is not None else ():
        model_site = model_trace.nodes.get(name)
        if model_site is None or model_site["type"] != "sample" or model_site["is_observed"]:
            raise ValueError(f"code site '{name}' of the guide has no latent site in the model")
        if plate not in site_plate_frames(model_site):
            raise ValueError(
                f"code site '{name}' lies inside plate '{plate}' in the guide but not in the model"
            )
    return CodeLayout(data_plate=_as_point_plate(frames[plate]), code_sites=names)


# -- where a code site's density is read --------------------------------------------------------
@dataclass(frozen=True)
class CodeSource:
    r"""Where the density :math:`q(z \mid x_n)` of one code site is read in a guide trace.

    Attributes
    ----------
    name : str
        The user's site name.
    site : dict
        The guide's site of that name (plates, scale, mask).
    value : torch.Tensor
        The sample in the space where ``fn`` is its density, shaped as the site's value
        (the unconstrained sample for an autoguide).
    fn : torch.distributions.Distribution
        The per-point density of ``value``, batch shape ``value.shape[:-event_dim]``.
    log_jacobian : torch.Tensor or None
        Batch-shaped :math:`\log |\partial u / \partial z|` of an autoguide's ``Delta`` at its
        value (``None`` when the site is sampled directly).
    """

    name: str
    site: dict
    value: torch.Tensor
    fn: Distribution
    log_jacobian: torch.Tensor | None = None


def _check_elementwise(name: str, model_site: dict | None, value_shape, unconstrained_shape):
    if tuple(value_shape) != tuple(unconstrained_shape):
        raise ValueError(
            f"code site '{name}': the autoguide's unconstrained sample has shape "
            f"{tuple(unconstrained_shape)} but the site's value {tuple(value_shape)}; the "
            "decomposition needs an elementwise transform to the site's support (real, positive, "
            "interval), not one that changes the dimension (e.g. a simplex)."
        )
    if model_site is not None:
        transform = biject_to(model_site["fn"].support)
        while isinstance(transform, IndependentTransform):
            transform = transform.base_transform
        if transform.domain.event_dim != 0 or transform.codomain.event_dim != 0:
            raise ValueError(
                f"code site '{name}': the autoguide maps it to its support with "
                f"{type(transform).__name__}, which mixes dimensions; the per-dimension marginals "
                "of the decomposition need an elementwise transform (real, positive or interval "
                "support)."
            )


def _unpacked_latent(
    guide: AutoContinuous, latent_site: dict, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return site ``name``'s unconstrained value, loc and scale in an autoguide's packed latent."""
    base = latent_site["fn"]
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal):
        raise ValueError(
            f"code site '{name}' is served by {type(guide).__name__}, whose latent "
            f"'{latent_site['name']}' is {type(base).__name__}: it couples the points of the "
            "dataset, so q(z | x_n) has no per-point density. Use AutoNormal or "
            "AutoDiagonalNormal."
        )
    value = latent_site["value"]
    parts = []
    for packed in (value, base.loc, base.scale):
        packed = torch.broadcast_to(packed, value.shape).contiguous()
        parts.append(next(v for s, v in guide._unpack_latent(packed) if s["name"] == name))
    return parts[0], parts[1], parts[2]


def packed_autoguide_subsampling(guide: Callable) -> str | None:
    """Say why a packed autoguide (``AutoDiagonalNormal``) cannot serve a subsampled data plate.

    Its one latent vector covers the points of the prototype it was set up with; set up on a
    minibatch, the same parameters meet a different random minibatch at every call.

    Returns
    -------
    str or None
        A message naming the guide and the plate, or ``None`` when it does not apply.
    """
    prototype = getattr(guide, "prototype_trace", None)
    if not isinstance(guide, AutoContinuous) or prototype is None:
        return None
    for _, site in sample_sites(prototype):
        for plate, frame in site_plate_frames(site).items():
            if _as_point_plate(frame).subsample_factor != 1.0:
                return (
                    f"{type(guide).__name__} was set up on a minibatch of plate '{plate}' "
                    f"({frame.size} of {frame.full_size} points), but its one latent vector "
                    "covers the points it was set up with, so it has no per-point parameters "
                    "to subsample. Use AutoNormal(model, create_plates=...) for minibatches, or "
                    "call the guide on the full data."
                )
    return None


def code_sources(
    guide: Callable, guide_trace: Trace, layout: CodeLayout, model_trace: Trace | None = None
) -> list[CodeSource]:
    """Read every code site's per-point density from a guide trace (see :class:`CodeSource`).

    Parameters
    ----------
    guide : callable
        The guide that made ``guide_trace`` (an autoguide is recognized by its class).
    guide_trace : pyro.poutine.Trace
        The guide's trace, subsample sites pruned.
    layout : CodeLayout
        The data plate and code sites.
    model_trace : pyro.poutine.Trace, optional
        The model's trace, to check that an autoguide's transform is elementwise.

    Returns
    -------
    list of CodeSource

    Raises
    ------
    ValueError
        For a code site that is a point mass (``Delta``) not backed by an autoguide's sample.
    """
    sources = []
    for name in layout.code_sites:
        site = guide_trace.nodes[name]
        fn = site["fn"]
        base = fn
        while isinstance(base, Independent):
            base = base.base_dist
        if not isinstance(base, dist.Delta):
            sources.append(CodeSource(name, site, site["value"], fn))
            continue
        model_site = model_trace.nodes.get(name) if model_trace is not None else None
        log_jacobian = fn.log_prob(site["value"])
        auxiliary = guide_trace.nodes.get(f"{name}_unconstrained")
        if auxiliary is not None and _is_auxiliary(auxiliary):
            _check_elementwise(name, model_site, site["value"].shape, auxiliary["value"].shape)
            sources.append(
                CodeSource(name, site, auxiliary["value"], auxiliary["fn"], log_jacobian)
            )
            continue
        latent = None
        if isinstance(guide, AutoContinuous):
            latent = next(
                (s for _, s in latent_sites(guide_trace) if _is_auxiliary(s)),
                None,
            )
        if latent is None:
            raise ValueError(
                f"code site '{name}' is a point mass (Delta) in the guide: the decomposition "
                "needs a density q(z | x_n) with spread, from which the aggregate posterior is "
                "built. Sample the code from a distribution (e.g. dist.Normal(loc, "
                "scale).to_event(1)), or use AutoNormal / AutoDiagonalNormal."
            )
        value, loc, scale = _unpacked_latent(guide, latent, name)
        _check_elementwise(name, model_site, site["value"].shape, value.shape)
        density = dist.Normal(loc, scale, validate_args=False).to_event(fn.event_dim)
        sources.append(CodeSource(name, site, value, density, log_jacobian))
    return sources


def _marginals(name: str, fn: Distribution) -> tuple[Distribution, Distribution | None]:
    """Return ``(marginal, joint)`` of a code site's density.

    ``marginal`` is a univariate distribution over every scalar of the site's value (batch shape =
    the value's shape); ``joint`` is ``fn`` when it is not the product of the marginals, else
    ``None``.
    """
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if base.event_shape == torch.Size():
        return base, None
    if isinstance(base, (MultivariateNormal, LowRankMultivariateNormal)):
        marginal = Normal(base.loc, base.variance.sqrt(), validate_args=False)
        return marginal, fn
    raise ValueError(
        f"Code site '{name}': the decomposed ELBO needs the per-dimension marginals "
        "q(z_d | x) of the guide, so the site's distribution must be factorized (an Independent "
        "of univariate distributions, e.g. dist.Normal(loc, scale).to_event(1)) or a "
        "MultivariateNormal / LowRankMultivariateNormal (exact Normal marginals). Got "
        f"{type(fn).__name__} with event_shape {tuple(fn.event_shape)}"
        + (f" around {type(base).__name__}" if base is not fn else "")
        + "."
    )


class CodeBlock:
    """One code site over a traced batch of points, in the canonical ``[S, B, D_site]`` layout.

    Parameters
    ----------
    name : str
        The site's name (for messages).
    value : torch.Tensor
        The site's value, shape ``[S, ..., B, ..., event]`` (particle dim first).
    fn : torch.distributions.Distribution
        The site's distribution, batch shape ``value.shape[:-event_dim]``.
    data_pos : int
        Position of the data dim in ``value.shape``.
    column_mask : torch.Tensor, optional
        Boolean ``[B]``: columns to leave out of the aggregate (points traced twice by an
        overlapping batch).
    """

    def __init__(
        self,
        name: str,
        value: torch.Tensor,
        fn: Distribution,
        data_pos: int,
        column_mask: torch.Tensor | None = None,
    ):
        if data_pos < 1 or data_pos >= value.dim() - len(fn.event_shape):
            raise ValueError(f"code site '{name}': data dim {data_pos} is not a batch dim")
        self.name = name
        self.data_pos = data_pos
        self.num_particles = value.shape[0]
        self.size = value.shape[data_pos]
        shape = list(value.shape)
        self.rest_shape = tuple(shape[1:data_pos] + shape[data_pos + 1 :])
        self.dim = math.prod(self.rest_shape)
        self.values = value.movedim(data_pos, 1).reshape(self.num_particles, self.size, self.dim)
        self.marginal, self.joint = _marginals(name, fn)
        self.column_log_mask = None
        if column_mask is not None:
            zero = torch.zeros((), dtype=value.dtype, device=value.device)
            self.column_log_mask = torch.where(column_mask, zero, zero - math.inf)

    def _rows(self, z_rows: torch.Tensor) -> torch.Tensor:
        """Reshape rows ``[S, c, D_site]`` to ``[c, S, ..., 1, ..., event]`` against all columns."""
        num_rows = z_rows.shape[1]
        native = z_rows.reshape(z_rows.shape[0], num_rows, *self.rest_shape).movedim(1, 0)
        return native.unsqueeze(self.data_pos + 1)

    def _pairs(self, log_prob: torch.Tensor) -> torch.Tensor:
        """Reshape ``[c, S, ..., B, ...]`` to ``[c, S, B, rest]``."""
        log_prob = log_prob.movedim(self.data_pos + 1, 2)
        return log_prob.reshape(log_prob.shape[0], log_prob.shape[1], self.size, -1)

    def pairwise(self, z_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate rows ``z_i`` (``[S, c, D_site]``) under every column's density.

        Returns
        -------
        joint : torch.Tensor
            ``[c, S, B]``: ``log q(z_i | x_j)``.
        marginal : torch.Tensor
            ``[c, S, B, D_site]``: ``log q(z_{i,d} | x_j)`` (masked columns at ``-inf``).
        """
        rows = self._rows(z_rows)
        marginal = self._pairs(self.marginal.log_prob(rows))
        if self.joint is None:
            joint = marginal.sum(-1)
        else:
            joint = self._pairs(self.joint.log_prob(rows)).sum(-1)
        if self.column_log_mask is not None:
            joint = joint + self.column_log_mask
            marginal = marginal + self.column_log_mask[:, None]
        return joint, marginal


def data_position(site: dict, plate: str, batch_len: int) -> int:
    """Position of ``plate``'s dim in a site value padded to ``batch_len`` batch dims."""
    frame = site_plate_frames(site)[plate]
    return batch_len + frame.dim


def _with_particle_dim(value: torch.Tensor, fn: Distribution, nesting: int) -> torch.Tensor:
    """Left-pad a value traced without particle plate to ``nesting`` batch dims (size 1).

    The density is left as it is: its batch shape broadcasts against the padded value, and
    :func:`~pyro_vi_ext.infer._kernels.canonical_normal` pads its parameters the same way.
    """
    missing = nesting + len(fn.event_shape) - value.dim()
    return value.reshape((1,) * missing + tuple(value.shape)) if missing > 0 else value


def code_blocks(
    sources: Sequence[CodeSource],
    layout: CodeLayout,
    nesting: int,
    column_mask: torch.Tensor | None = None,
    particle_plate: bool = True,
) -> list[CodeBlock]:
    """Arrange the code sites of a traced batch as :class:`CodeBlock` s.

    Parameters
    ----------
    sources : sequence of CodeSource
        From :func:`code_sources`.
    layout : CodeLayout
        The data plate and code sites.
    nesting : int
        Batch dims of every site, the particle plate included.
    column_mask : torch.Tensor, optional
        Boolean ``[B]``: columns to leave out of the aggregate.
    particle_plate : bool
        Whether the traces ran under the particle plate. Without it (one particle, traced as
        ``Trace_ELBO`` does) each value gets leading dims of size 1 up to ``nesting`` batch
        dims, so the blocks have the same ``[1, B, D_site]`` layout.

    Returns
    -------
    list of CodeBlock
    """
    blocks = []
    for source in sources:
        value, event_dim = source.value, len(source.fn.event_shape)
        if not particle_plate:
            value = _with_particle_dim(value, source.fn, nesting)
        if value.dim() != nesting + event_dim:
            raise ValueError(
                f"code site '{source.name}': value of shape {tuple(value.shape)} has "
                f"{value.dim() - event_dim} batch dims, expected {nesting} (particle plate "
                "included); set max_plate_nesting to the model's plate nesting."
            )
        position = data_position(source.site, layout.plate, nesting)
        blocks.append(CodeBlock(source.name, value, source.fn, position, column_mask))
    return blocks


def check_code_sites(model_trace: Trace, guide_trace: Trace, layout: CodeLayout) -> None:
    """Check what the minibatch estimators need of every guide latent: rsample and no masks.

    Raises
    ------
    ValueError
        Naming a guide site without ``rsample`` or a code site masked in the guide or model.
    """
    for name, site in latent_sites(guide_trace):
        if not site["fn"].has_rsample:
            role = "code site" if name in layout.code_sites else "guide site"
            raise ValueError(
                f"{role.capitalize()} '{name}' ({type(site['fn']).__name__}) has no rsample: the "
                "decomposed ELBO differentiates through reparameterized samples (its aggregate-"
                "posterior terms couple the points of a batch, so no per-point score-function "
                "term exists). Use a reparameterizable guide distribution."
            )
    for name in layout.code_sites:
        for kind, trace in (("guide", guide_trace), ("model", model_trace)):
            mask = trace.nodes[name]["mask"]
            if mask is not None and mask is not True:
                raise ValueError(
                    f"code site '{name}' is masked in the {kind}: masked points cannot be left out "
                    "of the aggregate posterior q(z); drop them from the batch instead."
                )


def code_scale(model_trace: Trace, guide_trace: Trace, layout: CodeLayout) -> float:
    """Return the factor ``trace_particles`` left on the code's log-densities in the log-weights.

    It is 1 when every site shares one user scale (that scale is then part of
    ``ParticleWeights.scale``), else the code sites' own, common, user scale.

    Raises
    ------
    ValueError
        When the code sites' user scales differ.
    """
    if common_user_scale((model_trace, guide_trace)) is not None:
        return 1.0
    code = {
        site_user_scale(trace.nodes[name])
        for trace in (model_trace, guide_trace)
        for name in layout.code_sites
    }
    if len(code) != 1 or None in code:
        raise ValueError(
            "The code sites carry different poutine.scale factors (model vs guide, or between "
            f"sites: {sorted(map(str, code))}); the decomposition needs one scale for the code. "
            "Anneal with DecomposedELBO's alpha/beta/gamma instead."
        )
    return code.pop()


def _per_point(
    log_prob: torch.Tensor, layout: CodeLayout, nesting: int, num_particles: int | None
) -> torch.Tensor:
    """Sum a site's batch log-density to ``[S, B]`` (particles, points of the data plate)."""
    return _reduce_to_points(log_prob, nesting, (layout.data_plate,), num_particles)


def code_log_densities(
    model_trace: Trace,
    sources: Sequence[CodeSource],
    layout: CodeLayout,
    nesting: int,
    num_particles: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""Per-point log-densities of the code, unscaled, ``[S, B]`` each.

    Parameters
    ----------
    model_trace : pyro.poutine.Trace
        The model's trace (the code sites' prior densities).
    sources : sequence of CodeSource
        From :func:`code_sources`.
    layout : CodeLayout
        The data plate and code sites.
    nesting : int
        Batch dims of the traces: the particle plate included when there is one.
    num_particles : int or None
        ``S`` under the particle plate, ``None`` without one (the result is then ``[1, B]``).

    Returns
    -------
    log_q_code : torch.Tensor
        :math:`\log q(z_i \mid x_i)` in the user's space (log-Jacobians included).
    log_p_code : torch.Tensor
        :math:`\log p(z_i)` of the model's code sites.
    log_jacobian : torch.Tensor or None
        The code's summed :math:`\log |\partial u / \partial z|` from autoguide sources, which
        every density of the code evaluated on :math:`u` must add back (``None`` if none).
    """
    log_q_code = log_p_code = log_jacobian = None
    for source in sources:
        log_q = _per_point(source.fn.log_prob(source.value), layout, nesting, num_particles)
        model_site = model_trace.nodes[source.name]
        log_p = _per_point(
            model_site["fn"].log_prob(model_site["value"]), layout, nesting, num_particles
        )
        if source.log_jacobian is not None:
            jacobian = _per_point(source.log_jacobian, layout, nesting, num_particles)
            log_q = log_q + jacobian
            log_jacobian = jacobian if log_jacobian is None else log_jacobian + jacobian
        log_q_code = log_q if log_q_code is None else log_q_code + log_q
        log_p_code = log_p if log_p_code is None else log_p_code + log_p
    return log_q_code, log_p_code, log_jacobian


def code_log_jacobian(
    sources: Sequence[CodeSource], layout: CodeLayout, nesting: int, num_particles: int | None
) -> torch.Tensor | None:
    r"""Return the code's summed :math:`\log |\partial u / \partial z|`, ``[S, B]``.

    As the third result of :func:`code_log_densities`, without computing the densities.

    Parameters
    ----------
    sources : sequence of CodeSource
        From :func:`code_sources`.
    layout : CodeLayout
        The data plate and code sites.
    nesting : int
        Batch dims of the traces: the particle plate included when there is one.
    num_particles : int or None
        ``S`` under the particle plate, ``None`` without one (the result is then ``[1, B]``).

    Returns
    -------
    torch.Tensor or None
        ``None`` when no source is an autoguide's (no log-Jacobian).
    """
    total = None
    for source in sources:
        if source.log_jacobian is not None:
            jacobian = _per_point(source.log_jacobian, layout, nesting, num_particles)
            total = jacobian if total is None else total + jacobian
    return total


def normal_prior_blocks(
    model_trace: Trace, layout: CodeLayout, nesting: int, particle_plate: bool = True
) -> list[CodeBlock] | None:
    r"""Return the model's code sites as :class:`CodeBlock` s when every prior is a Normal.

    The blocks hold the model's values and their prior densities :math:`p(z)` (an
    ``Independent`` of ``Normal``), so that :math:`\log p(z_i)` can be evaluated later from plain
    tensors. ``None`` when some code site's prior is another family.

    Parameters
    ----------
    model_trace : pyro.poutine.Trace
        The model's trace.
    layout : CodeLayout
        The data plate and code sites.
    nesting : int
        Batch dims of every site, the particle plate included.
    particle_plate : bool
        Whether the traces ran under the particle plate (see :func:`code_blocks`).

    Returns
    -------
    list of CodeBlock or None
    """
    blocks = []
    for name in layout.code_sites:
        site = model_trace.nodes[name]
        fn, value = site["fn"], site["value"]
        if not particle_plate:
            value = _with_particle_dim(value, fn, nesting)
        base = fn
        while isinstance(base, Independent):
            base = base.base_dist
        if not isinstance(base, Normal) or value.dim() != nesting + len(fn.event_shape):
            return None
        position = data_position(site, layout.plate, nesting)
        blocks.append(CodeBlock(name, value, fn, position))
    return blocks


__all__ = [
    "CodeBlock",
    "CodeLayout",
    "CodeSource",
    "check_code_sites",
    "code_blocks",
    "code_log_densities",
    "code_log_jacobian",
    "code_scale",
    "code_sources",
    "data_position",
    "find_code_layout",
    "normal_prior_blocks",
    "packed_autoguide_subsampling",
]
