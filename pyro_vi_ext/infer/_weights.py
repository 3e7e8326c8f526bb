"""Shared trace and plate bookkeeping for every estimator and diagnostic.

Everything in the package needs the same thing from a model and a guide: ``S`` draws of the
latents and, per draw and per data point, ``log p(x, z)`` and ``log q(z | x)``, with the
subsampling factor ``N / B`` of the data plate kept apart from a user's own
:func:`pyro.poutine.scale`. This module owns that computation; estimators never re-derive plate
arithmetic.

Conventions
-----------
* Particles are drawn either *vectorized* (one run of guide and model under a particle plate at
  dim ``-(plate_nesting + 1)``) or *sequentially* (one run per particle, no particle plate, the
  subsample indices of every plate replayed from the first particle so that all particles see one
  minibatch). Both give the same ``[S, P]`` layout and, on the same draws, the same values.
* The *point plates* are the vectorized plates shared by every sample site of the model and the
  guide (observed sites included). The importance-weighted bound is taken per element of those
  plates. With no shared plate the whole trace is one point.
* Per site, the unscaled log-density (mask applied, every batch dim that is not a point plate
  summed, as Pyro sums it) is multiplied by the site's *user scale*: its ``scale`` divided by the
  subsampling factors of its plates. When every site carries the same user scale it is not applied
  inside the log-weights but reported as part of :attr:`ParticleWeights.scale`, which also holds
  the subsampling factor of the point plates; estimators apply it after their log-mean-exp.
* A subsampled plate that is not a point plate (a latent outside the data plate, a subsampled
  sequential or nested plate) makes a per-point bound impossible: :func:`trace_particles` raises,
  unless the caller only takes means of the log-weights (an ELBO, ``linear_in_log_weights=True``):
  then every log-density carries Pyro's own scale (``N / B`` included), the trace is one point, and
  the estimate is unbiased as ``Trace_ELBO``'s is.
* Model sites marked ``infer={"enumerate": "parallel"}`` (e.g. by ``config_enumerate``) that the
  guide does not sample are summed out exactly inside ``log p(x, z)`` with Pyro's tensor
  contraction, per particle and per plate element.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from opt_einsum import get_symbol
from pyro.infer.util import is_validation_enabled
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.packed import pack, unpack
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from pyro_vi_ext.infer import _validation

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass(frozen=True)
class PointPlate:
    """A vectorized plate shared by every sample site: the data points of a per-point bound.

    Parameters
    ----------
    name : str
        The plate's name.
    dim : int
        Its (negative) batch dim.
    size : int
        Points in this call (the minibatch size ``B``).
    full_size : int
        Points in the dataset (``N``).
    """

    name: str
    dim: int
    size: int
    full_size: int

    @property
    def subsample_factor(self) -> float:
        """Return ``N / B``, the factor a minibatch sum is scaled by."""
        return self.full_size / self.size


@dataclass(frozen=True)
class ParticleRun:
    """One run of guide and model: all particles (vectorized) or one particle (sequential).

    Parameters
    ----------
    model_trace, guide_trace : pyro.poutine.Trace
        The traces, subsample sites pruned.
    detached_guide_trace : pyro.poutine.Trace or None
        The guide replayed with detached parameters (STL, DReG).
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    detached_guide_trace: poutine.Trace | None = None


@dataclass(frozen=True)
class SiteScore:
    """Score-function pieces of one guide site without ``rsample``, ``[S, P, E]``.

    ``E`` counts the site's plate elements within a point (its vectorized plates that are not point
    plates, flattened).

    Parameters
    ----------
    name : str
        The guide site.
    log_q : torch.Tensor
        ``[S, P, E]`` its log-density (mask applied, no scale), with gradient.
    log_weights : torch.Tensor
        ``[S, P, E]`` detached: the log-weight terms summed down to the site's plate elements, as
        ``Trace_ELBO``'s ``log_r.sum_to(site["cond_indep_stack"])`` (terms of the other elements of
        the site's own plates left out; every other term kept).
    """

    name: str
    log_q: torch.Tensor
    log_weights: torch.Tensor


@dataclass
class ParticleWeights:
    """Per-particle, per-point log-densities of one model/guide evaluation.

    Attributes
    ----------
    model_trace, guide_trace:
        The traces, subsample sites pruned (of the first particle on the sequential path).
        Vectorized guide values carry their reparameterized graph.
    num_particles:
        Total particles ``S``.
    particle_dim:
        Negative dim of the particle plate in every site's batch shape when vectorized; on the
        sequential path the values have no particle dim (see :attr:`vectorized`).
    point_plates:
        The shared plates, ordered from left to right.
    log_p, log_q:
        ``[S, P]`` tensors: log p(x, z) and log q(z | x) per particle and point, user scale applied
        when it is not uniform. ``P`` is the product of the point plate sizes (1 for whole-trace).
        ``log_q`` is computed with detached guide parameters when asked for (STL, DReG).
        Enumerated model sites are summed out of ``log_p``.
    score:
        ``[S, P]`` sum of log q over guide sites without ``rsample`` (with gradient; mask applied,
        no scale, as Pyro's ``score_function``), or ``None``.
    scale:
        Multiplier applied after the per-point reduction: the subsampling factor of the point plates
        times the uniform user scale.
    vectorized:
        Whether the particles were drawn on a particle plate (one run) or in a loop (one run each).
    runs:
        The :class:`ParticleRun` of each run (one when vectorized, ``S`` when sequential).
    site_scores:
        One :class:`SiteScore` per guide site without ``rsample`` (Rao-Blackwellized signals).
    whole_trace_scaled:
        True when the log-densities carry Pyro's full scale (``N / B`` included) and the trace is
        one point (``linear_in_log_weights=True`` with a subsampled plate that is not a point
        plate); :attr:`scale` is then 1.
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    num_particles: int
    particle_dim: int
    point_plates: tuple[PointPlate, ...]
    log_p: torch.Tensor
    log_q: torch.Tensor
    score: torch.Tensor | None
    scale: float
    vectorized: bool = True
    runs: tuple[ParticleRun, ...] = ()
    site_scores: tuple[SiteScore, ...] = field(default_factory=tuple)
    whole_trace_scaled: bool = False

    @property
    def log_weights(self) -> torch.Tensor:
        """``[S, P]`` log importance weights ``log p(x, z) - log q(z | x)``."""
        return self.log_p - self.log_q

    @property
    def num_points(self) -> int:
        """Number ``P`` of points in this call (product of the point plate sizes)."""
        return self.log_p.shape[-1]

    @property
    def data_size(self) -> float:
        """Number of data points the estimate stands for (full sizes of the point plates)."""
        return float(math.prod(p.full_size for p in self.point_plates))

    @property
    def points_represented(self) -> float:
        """Number of data points a whole-dataset estimate stands for, to report it per point.

        :attr:`data_size` when there are point plates; otherwise (latents outside the data plate,
        one point for the whole trace) the product of the full sizes of the vectorized plates
        that hold every observed site (1 without such a plate).
        """
        if self.point_plates:
            return self.data_size
        shared: set[tuple[str, int]] | None = None
        for _, site in sample_sites(self.model_trace):
            if not site["is_observed"]:
                continue
            plates = {
                (frame.name, int(frame.full_size if frame.full_size is not None else frame.size))
                for frame in site["cond_indep_stack"]
                if frame.vectorized and frame.name != PARTICLE_PLATE
            }
            shared = plates if shared is None else shared & plates
        return float(math.prod(size for _, size in shared or ()))

    def per_point_to_site(self, per_point: torch.Tensor, site: dict) -> torch.Tensor:
        """Reshape an ``[S, P]`` tensor so that it broadcasts against a vectorized site's value.

        Parameters
        ----------
        per_point : torch.Tensor
            ``[S, P]``.
        site : dict
            A sample site of the vectorized traces.

        Returns
        -------
        torch.Tensor
            Shape ``[S, 1.., sizes of the point plates at their dims, 1 per event dim]``.
        """
        nesting = -self.particle_dim
        shape = [1] * nesting
        shape[0] = per_point.shape[0]
        for plate in self.point_plates:
            shape[nesting + plate.dim] = plate.size
        event_dim = site["fn"].event_dim
        return per_point.reshape(shape + [1] * event_dim)

    def per_point_to_run_site(self, per_point: torch.Tensor, name: str, run: int) -> torch.Tensor:
        """Reshape an ``[S, P]`` tensor to broadcast against guide site ``name`` of run ``run``.

        Vectorized: as :meth:`per_point_to_site`. Sequential: row ``run`` (that run's particle),
        shaped to the point plates' dims of a value without particle dim.

        Parameters
        ----------
        per_point : torch.Tensor
            ``[S, P]``.
        name : str
            A guide sample site.
        run : int
            Index into :attr:`runs`.

        Returns
        -------
        torch.Tensor
            A tensor broadcasting against that site's value.
        """
        site = self.runs[run].guide_trace.nodes[name] if self.runs else self.guide_trace.nodes[name]
        if self.vectorized:
            return self.per_point_to_site(per_point, site)
        nesting = -self.particle_dim - 1
        shape = [1] * nesting
        for plate in self.point_plates:
            shape[nesting + plate.dim] = plate.size
        event_dim = site["fn"].event_dim
        batch_dims = site["value"].dim() - event_dim
        while len(shape) > batch_dims and shape and shape[0] == 1:
            shape.pop(0)  # a value with fewer batch dims than the nesting: do not add dims
        return per_point[run].reshape(shape + [1] * event_dim)


class ParticleVectorizationError(RuntimeError, ValueError):
    """A model or guide failed under the vectorized particle plate (it does not broadcast).

    A ``RuntimeError`` (torch's shape errors) and a ``ValueError`` (Pyro's plate shape mismatch).
    """


@contextlib.contextmanager
def _side_effect_free() -> Iterator[None]:
    """Hide a run from outer handlers, fork torch's RNG and drop the param-store entries it adds."""
    store = pyro.get_param_store()
    existing = set(store.keys())
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with poutine.block(), torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        added = set(store.keys()) - existing
        # a module registered under two names holds one tensor twice; the store maps each tensor
        # back to one name, so drop only tensors no earlier name holds, each once
        kept = {id(value) for name, value in store.named_parameters() if name not in added}
        for name, value in list(store.named_parameters()):
            if name not in added or id(value) in kept:
                continue
            try:
                del store[name]
            except KeyError:  # its tensor's reverse entry went with an earlier alias
                pass


def _one_sequential_particle_runs(model: Callable, guide: Callable, args, kwargs) -> bool:
    """Return whether guide and model run once without a particle plate (no side effects)."""
    try:
        with _side_effect_free():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any failure means the error is not the particle plate's
        return False
    return True


def guess_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Run model and guide once (hidden from outer handlers) and return their plate nesting.

    Parameters
    ----------
    model, guide : callable
        The model and guide.
    args, kwargs : tuple, dict
        Their arguments.

    Returns
    -------
    int
        The deepest vectorized plate dim used by any sample site, as a positive number.

    Notes
    -----
    The run leaves seeded results unchanged: it draws from a fork of torch's random state and
    removes the param-store entries it created, so the first real step initializes them from the
    same random numbers as ``Trace_ELBO`` would.
    """
    with _side_effect_free():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def site_subsample_factor(site: dict) -> float:
    """Return the product of ``full_size / size`` over a site's vectorized plates.

    The particle plate is left out. This is the only place in the package where a plate's
    subsampling factor is computed.

    Parameters
    ----------
    site : dict
        A trace site.

    Returns
    -------
    float
        ``1.0`` without subsampling.
    """
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and frame.full_size is not None and frame.name != PARTICLE_PLATE:
            factor *= frame.full_size / frame.size
    return factor


def site_plate_frames(site: dict) -> dict[str, object]:
    """Return a site's vectorized plate frames by name (the particle plate left out).

    Parameters
    ----------
    site : dict
        A trace site.

    Returns
    -------
    dict
        ``{name: CondIndepStackFrame}``.
    """
    return {
        frame.name: frame
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE
    }


def sample_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    """Yield ``(name, site)`` for every sample site of ``trace``.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        A trace.

    Yields
    ------
    tuple of (str, dict)
        The site's name and the site.
    """
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            yield name, site


def latent_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    """Yield ``(name, site)`` for every unobserved sample site of ``trace``.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        A trace.

    Yields
    ------
    tuple of (str, dict)
        The site's name and the site.
    """
    for name, site in sample_sites(trace):
        if not site["is_observed"]:
            yield name, site


def site_log_prob(site: dict) -> torch.Tensor:
    """Return the unscaled log-density of a site with its mask applied (zero where masked out).

    Parameters
    ----------
    site : dict
        A sample site.

    Returns
    -------
    torch.Tensor
        ``site["fn"].log_prob(site["value"])``, batch shaped.
    """
    log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is not None and mask is not True:
        if mask is False:
            return torch.zeros_like(log_prob)
        log_prob = log_prob.masked_fill(~mask, 0.0)
    return log_prob


def _user_scale(site: dict) -> float | torch.Tensor:
    scale = site["scale"]
    factor = site_subsample_factor(site)
    return scale / factor if factor != 1.0 else scale


def _as_number(scale: float | torch.Tensor) -> float | None:
    if isinstance(scale, torch.Tensor):
        return float(scale) if scale.numel() == 1 else None
    return float(scale)


def site_user_scale(site: dict) -> float | None:
    """Return a site's own scale, its plates' subsampling factors divided out.

    This is what a user's :func:`pyro.poutine.scale` (KL annealing, tempering) contributed;
    ``None`` when the scale is a tensor of more than one element.

    Parameters
    ----------
    site : dict
        A sample site.

    Returns
    -------
    float or None
        The user scale.
    """
    return _as_number(_user_scale(site))


def common_user_scale(traces: Sequence[poutine.Trace]) -> float | None:
    """Return the user scale shared by every sample site of ``traces`` (``None`` if they differ).

    A trace without sample sites has the common scale 1.

    Parameters
    ----------
    traces : sequence of pyro.poutine.Trace
        Model and guide traces.

    Returns
    -------
    float or None
        The common user scale.
    """
    scales = {site_user_scale(site) for trace in traces for _, site in sample_sites(trace)}
    if not scales:
        return 1.0
    if len(scales) > 1 or None in scales:
        return None
    return scales.pop()


def particle_plate(num_particles: int, plate_nesting: int) -> pyro.plate:
    """Return the vectorized particle plate, placed left of a model's ``plate_nesting`` dims.

    Parameters
    ----------
    num_particles : int
        Its size.
    plate_nesting : int
        The model's own plate nesting.

    Returns
    -------
    pyro.plate
        The plate named :data:`PARTICLE_PLATE` at dim ``-(plate_nesting + 1)``.
    """
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))


class _DetachGuideParameters(Messenger):
    """Run a guide with every parameter detached (the ``phi`` of ``log q_phi``).

    Covers ``pyro.param`` values, modules registered with :func:`pyro.module`, and every parameter
    of a guide that is itself an ``nn.Module`` (a :class:`~pyro.nn.PyroModule` or an autoguide,
    whose plain ``nn.Parameter`` attributes bypass ``pyro.param``). The originals are put back on
    exit.
    """

    def __init__(self, guide: Callable):
        super().__init__()
        self._guide = guide
        self._swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._patched: list[tuple[object, Callable]] = []

    def _detach_module(self, module: torch.nn.Module) -> None:
        # PyroModules return plain nn.Parameter attributes directly (pyro.param is only called
        # for registration), so every module's parameters are swapped, PyroModules included.
        for submodule in module.modules():
            for name, param in list(submodule._parameters.items()):
                if param is None or not param.requires_grad:
                    continue
                self._swapped.append((submodule, name, param))
                submodule._parameters[name] = param.detach()

    def __enter__(self):
        if isinstance(self._guide, torch.nn.Module):
            self._detach_module(self._guide)
        original = pyro.primitives.module

        def detaching_module(name, nn_module, update_module_params=False):
            result = original(name, nn_module, update_module_params)
            self._detach_module(result)
            return result

        for owner in (pyro, pyro.primitives):
            self._patched.append((owner, owner.module))
            owner.module = detaching_module
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, function in reversed(self._patched):
            owner.module = function
        self._patched.clear()
        for module, name, param in reversed(self._swapped):
            module._parameters[name] = param
        self._swapped.clear()
        return super().__exit__(*exc)

    def _pyro_post_param(self, msg) -> None:
        value = msg["value"]
        if isinstance(value, torch.Tensor):
            detached = value.detach()
            # plates that subsample parameters (AutoNormal) look up the unconstrained leaf
            for attribute in ("unconstrained", "_pyro_unconstrained_param"):
                if hasattr(value, attribute):
                    setattr(detached, attribute, getattr(value, attribute))
            msg["value"] = detached


def _replay_trace(guide_trace: poutine.Trace, values: dict[str, torch.Tensor]) -> poutine.Trace:
    """Return a replay trace with latent values replaced by ``values`` (subsample sites kept)."""
    trace = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            trace.add_node(name, **{**site, "value": values.get(name, site["value"])})
    return trace


_checked_detachment: weakref.WeakSet = weakref.WeakSet()


def _check_detachment(
    guide: Callable,
    wrapped_guide: Callable,
    trace: poutine.Trace,
    args,
    kwargs,
    checked: dict | None = None,
):
    """Once per guide: with detached values and parameters, log q must carry no gradient.

    A guide that is weakly referenceable is remembered module-wide; ``checked`` (a loss's
    structure cache) also remembers guides that are not, such as a bound method, a new object at
    every attribute access that a weak set forgets at once.
    """
    key = ("detachment-checked", _validation._program_key(guide))
    if checked is not None and key in checked:
        return
    try:
        if guide in _checked_detachment:
            return
    except TypeError:  # unhashable guide
        pass
    values = {name: site["value"].detach() for name, site in latent_sites(trace)}
    with poutine.block():
        with _DetachGuideParameters(guide):
            replayed = poutine.trace(
                poutine.replay(wrapped_guide, trace=_replay_trace(trace, values))
            ).get_trace(*args, **kwargs)
    replayed = prune_subsample_sites(replayed)
    for name, site in latent_sites(replayed):
        if site_log_prob(site).requires_grad:
            raise ValueError(
                f"Guide site '{name}': its log-density still depends on parameters after all "
                "pyro.param values and pyro.module modules were detached, so the STL/DReG "
                "estimator cannot remove the score term. Register every trainable tensor the guide "
                "uses with pyro.param, pyro.module(...) or a PyroModule."
            )
    with contextlib.suppress(TypeError):
        _checked_detachment.add(guide)
    if checked is not None:
        checked[key] = True


def _point_plates(traces: Sequence[poutine.Trace]) -> tuple[PointPlate, ...]:
    common: dict[str, object] | None = None
    for trace in traces:
        for _, site in sample_sites(trace):
            frames = site_plate_frames(site)
            if common is None:
                common = dict(frames)
            else:
                common = {
                    name: frame
                    for name, frame in common.items()
                    if name in frames and frames[name].dim == frame.dim
                }
    plates = [
        PointPlate(
            name=f.name,
            dim=f.dim,
            size=int(f.size),
            full_size=int(f.full_size if f.full_size is not None else f.size),
        )
        for f in (common or {}).values()
    ]
    return tuple(sorted(plates, key=lambda p: p.dim))


class SubsamplingError(ValueError):
    """A subsampled plate that is not a point plate: no per-point bound has a minibatch estimate.

    Parameters
    ----------
    message : str
        The message worded for the importance-weighted bounds.
    plate : str
        The subsampled plate's name.
    sites : list of str
        ``"guide site 'g'"``-style descriptions of the sites outside it (at most five); empty for
        a subsampled sequential plate.
    sequential : bool
        Whether the plate is a subsampled sequential plate (rather than one that latents lie
        outside).
    """

    def __init__(self, message: str, plate: str, sites: list[str], sequential: bool) -> None:
        super().__init__(message)
        self.plate = plate
        self.sites = sites
        self.sequential = sequential


def _subsampling_problem(
    traces: Sequence[poutine.Trace], plates: tuple[PointPlate, ...]
) -> SubsamplingError | None:
    """Why no per-point bound has an unbiased minibatch estimate here (``None`` if one has)."""
    point_names = {p.name for p in plates}
    subsampled = {}
    for trace in traces:
        for site_name, site in sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                # a sequential plate is never a point plate, and its N / B would pass for a user
                # scale: the minibatch estimate of the whole-trace bound would be silently biased
                if not frame.vectorized and frame.full_size not in (None, frame.size):
                    return SubsamplingError(
                        f"Plate '{frame.name}' is a subsampled sequential plate (site "
                        f"'{site_name}'). Importance-weighted bounds are per point only over "
                        "vectorized plates, and a whole-trace bound with more than one particle "
                        "has no unbiased minibatch estimate. Use a vectorized 'with pyro.plate("
                        f'"{frame.name}", ...)\', pass the full data (no subsample_size), or '
                        "num_particles=1 (the ELBO, unbiased under any subsampling).",
                        frame.name,
                        [],
                        True,
                    )
            for frame in site_plate_frames(site).values():
                if frame.full_size is not None and frame.full_size != frame.size:
                    subsampled[frame.name] = frame
    for plate_name in subsampled:
        if plate_name in point_names:
            continue
        outside = [
            (kind, name)
            for kind, trace in (("guide", traces[1]), ("model", traces[0]))
            for name, site in sample_sites(trace)
            if plate_name not in site_plate_frames(site)
        ]
        sites = [f"{kind} site '{name}'" for kind, name in outside[:5]]
        where = ", ".join(sites)
        return SubsamplingError(
            f"Plate '{plate_name}' is subsampled, but {where} lie outside it. A per-data-point "
            "importance-weighted bound needs every sample site inside the subsampled data plate; "
            "with latents outside it the bound covers the whole dataset and no unbiased minibatch "
            f"estimate of it exists for K > 1. Pass the full data to '{plate_name}' (no "
            "subsample_size), move those latents inside the plate, or use num_particles=1 (the "
            "ELBO, unbiased under subsampling, as Trace_ELBO).",
            plate_name,
            sites,
            False,
        )
    return None


def _frame_names(site: dict) -> dict[int, str]:
    """``{dim: plate name}`` of a site's vectorized plates, the particle plate left out."""
    return {frame.dim: frame.name for frame in site_plate_frames(site).values()}


def _reduce_to_frames(
    log_prob: torch.Tensor,
    frames: dict[int, str],
    targets: Sequence[tuple[int, str, int]],
    window: int,
    num_particles: int | None,
    site_name: str,
) -> torch.Tensor:
    """Sum a batch log-density onto the particle dim and the ``targets`` plate dims.

    ``frames`` maps the dims of the term's own plates to their names; ``targets`` lists
    ``(dim, name, size)``. A target dim is kept only where the term lies in that very plate (a
    different plate at the same dim is summed over), then broadcast to the target's size. Every
    other batch dim is summed, including dims left of the plate ``window`` and non-plate dims of
    size > 1 (extra batch dims of parameters or observations), as ``log_prob_sum`` does.
    ``num_particles`` is ``S`` when dim ``-window`` is the particle plate, ``None`` on the
    sequential path. Returns ``[S or 1, prod target sizes]``.
    """
    extra = log_prob.dim() - window
    if extra > 0:
        log_prob = log_prob.sum(list(range(extra)))
    elif extra < 0:
        log_prob = log_prob.reshape((1,) * -extra + tuple(log_prob.shape))
    keep = {window + dim for dim, name, _ in targets if frames.get(dim) == name}
    if num_particles is not None:
        keep.add(0)
        if log_prob.shape[0] not in (1, num_particles):
            raise ValueError(
                f"Site '{site_name}': its log-density has size {log_prob.shape[0]} at the particle "
                f"dim {-window} (expected {num_particles} or 1): a batch dim that is not a plate "
                "sits where the particle plate goes. Declare max_plate_nesting to cover all its "
                "plates, or use vectorize_particles=False."
            )
    reduce = [d for d in range(window) if d not in keep and log_prob.shape[d] != 1]
    if reduce:
        log_prob = log_prob.sum(reduce, keepdim=True)
    leading = num_particles if num_particles is not None else 1
    shape = [leading] + [size for _, _, size in targets]
    squeezed_shape = [log_prob.shape[0] if num_particles is not None else 1]
    squeezed_shape += [log_prob.shape[window + dim] for dim, _, _ in targets]
    return log_prob.reshape(squeezed_shape).expand(shape).reshape(leading, -1)


def _reduce_to_points(
    log_prob: torch.Tensor, nesting: int, plates: tuple[PointPlate, ...], num_particles: int
) -> torch.Tensor:
    """Sum the log-density of a site that lies in every one of ``plates`` to ``[S, P]``.

    ``nesting`` counts the particle plate; used by the decomposed loss for its code sites.
    """
    frames = {plate.dim: plate.name for plate in plates}
    return _reduce_to_frames(
        log_prob, frames, _point_targets(plates), nesting, num_particles, "code site"
    )


@dataclass(frozen=True)
class _Term:
    """One summand of ``log w``: a batch log-density, the dims of its plates, a sign."""

    name: str
    log_prob: torch.Tensor
    frames: dict[int, str]
    sign: float


def _point_targets(plates: tuple[PointPlate, ...]) -> list[tuple[int, str, int]]:
    return [(p.dim, p.name, p.size) for p in plates]


def _enumerated_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [
        (name, site)
        for name, site in latent_sites(trace)
        if site["infer"].get("_enumerate_dim") is not None
    ]


def _model_terms(
    trace: poutine.Trace, scale_of: Callable[[dict], float | torch.Tensor | None]
) -> list[_Term]:
    """Return the model's log-density terms, enumerated sites summed out by tensor contraction.

    ``scale_of(site)`` is the factor a site's log-density is multiplied by (``None``: none).
    """
    enumerated = _enumerated_sites(trace)
    enum_dims = {site["infer"]["_enumerate_dim"] for _, site in enumerated}
    terms, factors = [], []
    for name, site in sample_sites(trace):
        log_prob = site_log_prob(site)
        depends = (
            any(-dim <= log_prob.dim() and log_prob.shape[dim] > 1 for dim in enum_dims)
            or site["infer"].get("_enumerate_dim") is not None
        )
        if depends:
            factors.append((name, site, log_prob))
            continue
        scale = scale_of(site)
        terms.append(
            _Term(name, log_prob if scale is None else log_prob * scale, _frame_names(site), 1.0)
        )
    if not factors:
        return terms

    lowest = min(enum_dims)
    dim_to_symbol = {dim: get_symbol(i) for i, dim in enumerate(range(-1, lowest - 1, -1))}
    symbol_to_dim = {symbol: dim for dim, symbol in dim_to_symbol.items()}
    plate_at: dict[int, str] = {}
    scales = set()
    tree: OrderedDict = OrderedDict()
    for name, site, log_prob in factors:
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and plate_at.setdefault(frame.dim, frame.name) != frame.name:
                raise ValueError(
                    f"Site '{name}': plates '{plate_at[frame.dim]}' and '{frame.name}' share dim "
                    f"{frame.dim} among the sites that depend on enumerated variables; give them "
                    "distinct dims."
                )
        ordinal = frozenset(
            dim_to_symbol[frame.dim] for frame in site["cond_indep_stack"] if frame.vectorized
        )
        tree.setdefault(ordinal, []).append(pack(log_prob, dim_to_symbol))
        scale = scale_of(site)
        scales.add(1.0 if scale is None else _as_number(scale))
    if len(scales) > 1 or None in scales:
        names = ", ".join(f"'{name}'" for name, _, _ in factors)
        raise ValueError(
            f"Sites {names} depend on enumerated variables but carry different scales "
            "(poutine.scale); an enumerated sum needs one common scale on its factors."
        )
    common = scales.pop()
    sum_symbols = {dim_to_symbol[dim] for dim in enum_dims}
    contracted = contract_tensor_tree(tree, sum_symbols, ring=LogRing())
    label = "+".join(name for name, _, _ in factors)
    for ordinal, packed_terms in contracted.items():
        frames = {
            symbol_to_dim[symbol]: plate_at[symbol_to_dim[symbol]]
            for symbol in ordinal
            if plate_at[symbol_to_dim[symbol]] != PARTICLE_PLATE
        }
        for packed_term in packed_terms:
            log_prob = unpack(packed_term, symbol_to_dim)
            if common != 1.0:
                log_prob = log_prob * common
            terms.append(_Term(f"enumerated sum over {label}", log_prob, frames, 1.0))
    return terms


def _guide_terms(
    trace: poutine.Trace, scale_of: Callable[[dict], float | torch.Tensor | None]
) -> list[_Term]:
    terms = []
    for name, site in latent_sites(trace):
        scale = scale_of(site)
        log_prob = site_log_prob(site)
        terms.append(
            _Term(name, log_prob if scale is None else log_prob * scale, _frame_names(site), -1.0)
        )
    return terms


def _sum_terms(
    terms: Sequence[_Term],
    targets: Sequence[tuple[int, str, int]],
    window: int,
    num_particles: int | None,
    size: int,
) -> torch.Tensor:
    total = None
    for term in terms:
        reduced = _reduce_to_frames(
            term.log_prob, term.frames, targets, window, num_particles, term.name
        )
        total = reduced if total is None else total + reduced
    if total is None:
        total = torch.zeros(num_particles or 1, size)
    return total


class _SiteTracker(Messenger):
    """Remember the sample site in flight and the last one completed (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.completed: str | None = None

    def _pyro_sample(self, msg) -> None:
        self.current = msg["name"]

    def _pyro_post_sample(self, msg) -> None:
        self.completed = msg["name"]
        self.current = None


def _vectorization_error(
    error: Exception, role: str, tracker: _SiteTracker, num_particles: int, particle_dim: int
) -> ParticleVectorizationError:
    if tracker.current is not None:
        where = f"at site '{tracker.current}'"
    elif tracker.completed is not None:
        where = f"after site '{tracker.completed}'"
    else:
        where = "before its first sample site"
    return ParticleVectorizationError(
        f"The {role} failed {where} while running under the vectorized particle plate "
        f"'{PARTICLE_PLATE}' ({num_particles} particles at dim {particle_dim}): "
        f"{type(error).__name__}: {error}\nThe {role} does not broadcast over an extra leftmost "
        "batch dim (e.g. F.linear on a PyroSample weight, locs[assignment] indexing, x @ w on a "
        "batched global). Pass vectorize_particles=False to the loss (a loop over particles with "
        "the same values, one minibatch for all), or make every site broadcast (Vindex, "
        "(x * w).sum(-1))."
    )


def _is_shape_error(error: Exception) -> bool:
    """Torch's runtime errors, and Pyro's shape mismatch against the particle plate."""
    if isinstance(error, RuntimeError):
        return True
    return f"plate('{PARTICLE_PLATE}')" in str(error)


def _subsample_sites(*traces: poutine.Trace) -> poutine.Trace:
    """Return a replay trace holding only the plates' subsample index sites of ``traces``."""
    replay = poutine.Trace()
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and isinstance(site["fn"], _Subsample):
                if name not in replay.nodes:
                    replay.add_node(name, **site)
    return replay


def _merge_replay(source: poutine.Trace, extra: poutine.Trace | None) -> poutine.Trace:
    if extra is None:
        return source
    merged = poutine.Trace()
    for name, site in source.nodes.items():
        merged.add_node(name, **site)
    for name, site in extra.nodes.items():
        if name not in merged.nodes:
            merged.add_node(name, **site)
    return merged


def _check_guide_sites(guide_trace: poutine.Trace, require_rsample: str | None) -> None:
    for name, site in latent_sites(guide_trace):
        if site["infer"].get("enumerate"):
            raise ValueError(
                f"Guide site '{name}' asks for enumeration, which importance-weighted and "
                "decomposed ELBOs do not support; use TraceEnum_ELBO or remove infer['enumerate'] "
                "(model-side enumeration is supported)."
            )
        if require_rsample and not site["fn"].has_rsample:
            raise ValueError(
                f"Guide site '{name}' ({type(site['fn']).__name__}) has no rsample, but the "
                f"'{require_rsample}' estimator differentiates through reparameterized samples. "
                "Use estimator='iwae' (score-function gradient for this site) or a "
                "reparameterizable guide distribution."
            )


def _run_once(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    window: int,
    guide_replay: poutine.Trace | None,
    model_replay: poutine.Trace | None,
    latent_hook: Callable[[str, torch.Tensor], torch.Tensor] | None,
    vectorized: tuple[int, int] | None,
    runs_sequentially: Callable[[], bool] | None = None,
) -> tuple[poutine.Trace, poutine.Trace, dict[str, torch.Tensor]]:
    """Trace the guide, then the model replayed on its values (full traces, subsample kept).

    ``vectorized`` is ``(num_particles, particle_dim)`` under a particle plate, else ``None``.
    ``runs_sequentially()`` tells whether one particle runs without the plate: a failure that
    Pyro or torch reports as a shape or index error of any plate is then the particle plate's.
    """

    def caused_by_particle_plate(error: Exception) -> bool:
        if _is_shape_error(error):
            return True
        return runs_sequentially is not None and runs_sequentially()

    enumerating_model = poutine.enum(model, first_available_dim=-(window + 1))
    guide_fn = guide if guide_replay is None else poutine.replay(guide, trace=guide_replay)
    tracker = _SiteTracker()
    try:
        with tracker:
            guide_trace = poutine.trace(guide_fn).get_trace(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError) as error:
        if vectorized is None or not caused_by_particle_plate(error):
            raise
        raise _vectorization_error(error, "guide", tracker, *vectorized) from error
    aliases: dict[str, torch.Tensor] = {}
    source = guide_trace
    if latent_hook is not None:
        aliases = {
            name: latent_hook(name, site["value"])
            for name, site in latent_sites(guide_trace)
            if not isinstance(site["fn"], _Subsample)
        }
        source = _replay_trace(guide_trace, aliases)
    source = _merge_replay(source, model_replay)
    tracker = _SiteTracker()
    try:
        with tracker:
            model_trace = poutine.trace(poutine.replay(enumerating_model, trace=source)).get_trace(
                *args, **kwargs
            )
    except (RuntimeError, ValueError, IndexError) as error:
        if vectorized is None or not caused_by_particle_plate(error):
            raise
        raise _vectorization_error(error, "model", tracker, *vectorized) from error
    return model_trace, guide_trace, aliases


def _detached_replay(
    guide: Callable,
    run_guide: Callable,
    full_guide_trace: poutine.Trace,
    aliases: dict,
    args: tuple,
    kwargs: dict,
) -> poutine.Trace:
    """Replay ``run_guide`` (``guide`` under the particle plate, or itself) with detached params."""
    replay_source = _replay_trace(full_guide_trace, aliases) if aliases else full_guide_trace
    with poutine.block():
        with _DetachGuideParameters(guide):
            detached = poutine.trace(poutine.replay(run_guide, trace=replay_source)).get_trace(
                *args, **kwargs
            )
    return prune_subsample_sites(detached)


def _detached_distribution(fn) -> torch.distributions.Distribution | None:
    """Rebuild a Normal (or ``Independent`` Normal) with detached parameters; else ``None``.

    The distribution has the same values and log-density as the original, with the guide
    parameters' graph cut (the ``q_{sg(phi)}`` of STL / DReG).
    """
    if type(fn) in _DETACHABLE_INDEPENDENT:
        base = _detached_distribution(fn.base_dist)
        if base is None:
            return None
        return type(fn)(base, fn.reinterpreted_batch_ndims, validate_args=False)
    if type(fn) in _DETACHABLE_NORMAL:
        return type(fn)(fn.loc.detach(), fn.scale.detach(), validate_args=False)
    return None


_DETACHABLE_NORMAL = (torch.distributions.Normal, pyro.distributions.Normal)
_DETACHABLE_INDEPENDENT = (torch.distributions.Independent, pyro.distributions.Independent)


def guide_structure(guide_trace: poutine.Trace) -> tuple:
    """Return a key that changes whenever a guide trace's structure does.

    Per sample site: name, distribution type, batch and event shape, value shape and the plate
    frames (name, dim, size). Used to cache, per structure, what only needs checking once.

    Parameters
    ----------
    guide_trace : pyro.poutine.Trace
        A guide trace.

    Returns
    -------
    tuple
        Hashable key.
    """
    key = []
    for name, site in sample_sites(guide_trace):
        fn = site["fn"]
        value = site["value"]
        key.append(
            (
                name,
                type(fn),
                tuple(getattr(fn, "batch_shape", ())),
                tuple(getattr(fn, "event_shape", ())),
                tuple(value.shape) if isinstance(value, torch.Tensor) else None,
                tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"]),
                site["is_observed"],
                site["infer"].get("enumerate"),
                site["mask"] is None or isinstance(site["mask"], bool),
            )
        )
    return tuple(key)


def _parameters_independent_of_latents(guide_trace: poutine.Trace) -> bool:
    """Whether no guide site's distribution parameters depend on an earlier guide latent.

    Then detaching each site's parameters equals replaying the guide with detached parameters
    (no path derivative runs from one latent through another site's parameters).
    """
    earlier: list[torch.Tensor] = []
    for _, site in latent_sites(guide_trace):
        fn = site["fn"]
        while type(fn) in _DETACHABLE_INDEPENDENT:
            fn = fn.base_dist
        params = [p for p in (fn.loc, fn.scale) if p.requires_grad]
        if earlier and params:
            grads = torch.autograd.grad(
                [p.sum() for p in params], earlier, retain_graph=True, allow_unused=True
            )
            if any(g is not None for g in grads):
                return False
        if site["value"].requires_grad:
            earlier.append(site["value"])
    return True


def detached_guide_from_distributions(
    guide_trace: poutine.Trace,
    aliases: dict[str, torch.Tensor],
    independence_cache: dict | None = None,
) -> poutine.Trace | None:
    """Return the detached guide trace (STL / DReG) without replaying the guide, if possible.

    Each latent site's distribution is rebuilt with detached parameters (Normal and Independent
    Normal; see :func:`_detached_distribution`) and evaluated at the site's value (its DReG alias
    when given). This equals a replay of the guide with detached parameters, in value and
    gradient, when no site's parameters depend on an earlier latent; that is checked once per
    guide structure (``independence_cache``, keyed on :func:`guide_structure`) when the guide has
    more than one latent. ``None`` (use the replay) for any other distribution or a dependent
    guide.

    Parameters
    ----------
    guide_trace : pyro.poutine.Trace
        The guide trace, subsample sites pruned.
    aliases : dict
        DReG's aliases of the latent values by site name (may be empty).
    independence_cache : dict, optional
        Structure key -> bool, owned by the caller (a loss instance).

    Returns
    -------
    pyro.poutine.Trace or None
        A trace holding the guide's latent sites with detached distributions.
    """
    latents = list(latent_sites(guide_trace))
    detached = {}
    for name, site in latents:
        fn = _detached_distribution(site["fn"])
        if fn is None or site["args"] or site["kwargs"]:
            return None
        detached[name] = fn
    if len(latents) > 1 and torch.is_grad_enabled():
        key = guide_structure(guide_trace)
        independent = None if independence_cache is None else independence_cache.get(key)
        if independent is None:
            independent = _parameters_independent_of_latents(guide_trace)
            if independence_cache is not None:
                independence_cache[key] = independent
        if not independent:
            return None
    trace = poutine.Trace()
    for name, site in latents:
        trace.add_node(
            name, **{**site, "fn": detached[name], "value": aliases.get(name, site["value"])}
        )
    return trace


def trace_particles(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    plate_nesting: int,
    detach_guide_parameters: bool = False,
    latent_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    require_rsample: str | None = None,
    vectorize: bool = True,
    linear_in_log_weights: bool = False,
    structure_cache: dict | None = None,
) -> ParticleWeights:
    """Draw ``num_particles`` particles of ``guide``, replay ``model`` on them, collect log-weights.

    Parameters
    ----------
    model, guide : callable
        The Pyro model and guide.
    args, kwargs : tuple, dict
        Their arguments.
    num_particles : int
        Number ``S`` of particles.
    plate_nesting : int
        The model's own maximal plate nesting (without the particle plate).
    detach_guide_parameters : bool
        Compute ``log_q`` from a replay of the guide with detached parameters (STL, DReG), keeping
        the path derivative through the reparameterized latents.
    latent_hook : callable, optional
        ``latent_hook(name, value)`` returns the tensor the model and the detached guide replay
        consume in place of each guide latent's value (DReG's aliases,
        :class:`~pyro_vi_ext.infer._gradients.DregAliases`); called once per run.
    require_rsample : str, optional
        Name of the estimator that needs every guide site reparameterized; a site without
        ``rsample`` then raises.
    vectorize : bool
        Draw all particles in one run on a particle plate at dim ``-(plate_nesting + 1)``
        (default), or in a loop of ``S`` runs without particle plate, every plate's subsample
        indices replayed from the first run (one minibatch for all particles). A vectorized run
        that fails inside the model or guide raises :class:`ParticleVectorizationError` naming the
        site and suggesting the loop.
    linear_in_log_weights : bool
        The caller only averages the log-weights over particles (an ELBO, ``K = 1``): a subsampled
        plate that is not a point plate is then allowed, with Pyro's scaled log-densities and one
        point for the whole trace, instead of an error.
    structure_cache : dict, optional
        A dict owned by the caller (one per loss) in which facts that only change with the
        model's structure are cached, keyed on that structure (:func:`guide_structure`): whether
        the detached ``log q`` can be computed from the guide trace's own distributions (no
        parameter depends on another latent), and the validation checks already passed. Without
        it every call re-checks.

    Returns
    -------
    ParticleWeights
        ``[S, P]`` log-densities, traces and scales.
    """
    particle_dim = -(plate_nesting + 1)
    window = plate_nesting + 1 if vectorize else plate_nesting
    validate = is_validation_enabled()
    runs_full: list[tuple[poutine.Trace, poutine.Trace, dict]] = []
    if vectorize:
        plate = particle_plate(num_particles, plate_nesting)
        wrapped_guide, wrapped_model = plate(guide), plate(model)
        runs_full.append(
            _run_once(
                wrapped_model,
                wrapped_guide,
                args,
                kwargs,
                window=window,
                guide_replay=None,
                model_replay=None,
                latent_hook=latent_hook,
                vectorized=(num_particles, particle_dim),
                runs_sequentially=lambda: _one_sequential_particle_runs(model, guide, args, kwargs),
            )
        )
    else:
        wrapped_guide, wrapped_model = guide, model
        guide_replay = model_replay = None
        for _ in range(num_particles):
            run = _run_once(
                model,
                guide,
                args,
                kwargs,
                window=window,
                guide_replay=guide_replay,
                model_replay=model_replay,
                latent_hook=latent_hook,
                vectorized=None,
            )
            if guide_replay is None:
                guide_replay = _subsample_sites(run[1])
                model_replay = _subsample_sites(run[0], run[1])
            runs_full.append(run)

    runs: list[ParticleRun] = []
    for index, (full_model_trace, full_guide_trace, aliases) in enumerate(runs_full):
        # structure checks: once per (model, guide, structure) when the caller keeps a cache
        checked_key = None
        if structure_cache is not None:
            checked_key = (
                "checked",
                _validation._program_key(model),
                _validation._program_key(guide),
                window,
                validate,
                guide_structure(full_model_trace),
                guide_structure(full_guide_trace),
            )
        already_checked = checked_key is not None and checked_key in structure_cache
        if index == 0 and not already_checked:
            _validation.check_model_guide_traces(full_model_trace, full_guide_trace, plate_nesting)
        if validate and not already_checked:
            check_model_guide_match(full_model_trace, full_guide_trace, window)
        model_trace = prune_subsample_sites(full_model_trace)
        guide_trace = prune_subsample_sites(full_guide_trace)
        if index == 0:
            if validate:
                check_finite_observations(model_trace)
            _check_guide_sites(guide_trace, require_rsample)
        detached = None
        if detach_guide_parameters:
            if validate and index == 0:
                _check_detachment(
                    guide, wrapped_guide, full_guide_trace, args, kwargs, structure_cache
                )
            detached = detached_guide_from_distributions(
                guide_trace,
                aliases,
                None
                if structure_cache is None
                else structure_cache.setdefault(("detach", _validation._program_key(guide)), {}),
            )
            if detached is None:
                detached = _detached_replay(
                    guide, wrapped_guide, full_guide_trace, aliases, args, kwargs
                )
        runs.append(ParticleRun(model_trace, guide_trace, detached))
        if validate and not already_checked:
            for trace in (model_trace, guide_trace):
                for _, site in sample_sites(trace):
                    check_site_shape({**site, "log_prob": site_log_prob(site)}, window)
        if checked_key is not None:
            structure_cache[checked_key] = True

    first = runs[0]
    traces = (first.model_trace, first.guide_trace)
    plates = _point_plates(traces)
    problem = _subsampling_problem(traces, plates)
    whole_trace_scaled = False
    if problem is not None:
        if not linear_in_log_weights:
            raise problem
        plates, whole_trace_scaled = (), True

    user_scales = [_user_scale(site) for t in traces for _, site in sample_sites(t)]
    numbers = [_as_number(s) for s in user_scales]
    uniform = all(n is not None for n in numbers) and len(set(numbers)) <= 1
    if whole_trace_scaled:

        def scale_of(site):
            return site["scale"]

        outer_scale = 1.0
    elif uniform:

        def scale_of(site):
            return None

        outer_scale = (numbers[0] if numbers else 1.0) * math.prod(
            p.subsample_factor for p in plates
        )
    else:
        scale_of = _user_scale
        outer_scale = math.prod(p.subsample_factor for p in plates)

    leading = num_particles if vectorize else None
    targets = _point_targets(plates)
    size = math.prod(p.size for p in plates)
    log_p_rows, log_q_rows, score_rows = [], [], []
    site_pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for run in runs:
        model_terms = _model_terms(run.model_trace, scale_of)
        nonreparam = [
            (name, site)
            for name, site in latent_sites(run.guide_trace)
            if not site["fn"].has_rsample
        ]
        # STL / DReG: log q comes from the detached trace alone (every site has rsample), so the
        # guide trace's own log-densities are only computed when a score term needs them
        guide_terms = None
        if run.detached_guide_trace is None or nonreparam:
            guide_terms = _guide_terms(run.guide_trace, scale_of)
        q_terms = guide_terms
        if run.detached_guide_trace is not None:
            q_terms = _guide_terms(run.detached_guide_trace, scale_of)
        log_p_rows.append(_sum_terms(model_terms, targets, window, leading, size))
        log_q_rows.append(_sum_terms(q_terms, targets, window, leading, size))
        if nonreparam:
            all_terms = [*model_terms, *guide_terms]
            score_total = None
            for name, site in nonreparam:
                site_targets = targets + [
                    (dim, plate_name, int(site_plate_frames(site)[plate_name].size))
                    for dim, plate_name in sorted(_frame_names(site).items())
                    if plate_name not in {p.name for p in plates}
                ]
                elements = math.prod(t[2] for t in site_targets) // size
                log_q_site = _reduce_to_frames(
                    site_log_prob(site), _frame_names(site), site_targets, window, leading, name
                )
                with torch.no_grad():
                    signal = None
                    for term in all_terms:
                        reduced = term.sign * _reduce_to_frames(
                            term.log_prob, term.frames, site_targets, window, leading, term.name
                        )
                        signal = reduced if signal is None else signal + reduced
                rows = log_q_site.shape[0]
                site_pieces.setdefault(name, []).append(
                    (log_q_site.reshape(rows, size, elements), signal.reshape(rows, size, elements))
                )
                per_point = log_q_site.reshape(rows, size, elements).sum(-1)
                score_total = per_point if score_total is None else score_total + per_point
            score_rows.append(score_total)

    log_p, log_q, score = _stack_rows(log_p_rows), _stack_rows(log_q_rows), _stack_rows(score_rows)
    site_scores = tuple(
        SiteScore(
            name,
            torch.cat([piece[0] for piece in pieces], 0),
            torch.cat([piece[1] for piece in pieces], 0),
        )
        for name, pieces in site_pieces.items()
    )
    return ParticleWeights(
        model_trace=first.model_trace,
        guide_trace=first.guide_trace,
        num_particles=num_particles,
        particle_dim=particle_dim,
        point_plates=plates,
        log_p=log_p,
        log_q=log_q,
        score=score,
        scale=outer_scale,
        vectorized=vectorize,
        runs=tuple(runs),
        site_scores=site_scores,
        whole_trace_scaled=whole_trace_scaled,
    )


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """Concatenate per-run ``[S, P]`` rows on dim 0 (one run: that tensor, uncopied; none: None)."""
    if not rows:
        return None
    return rows[0] if len(rows) == 1 else torch.cat(rows, 0)


def check_finite_observations(trace: poutine.Trace) -> None:
    """Raise ``ValueError`` naming the first observed site with NaN or infinite values.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        A model trace.
    """
    for name, site in sample_sites(trace):
        value = site["value"]
        if site["is_observed"] and isinstance(value, torch.Tensor) and value.is_floating_point():
            # a NaN or an infinity makes the sum non-finite, so a finite sum proves every value
            # finite (a 0-d read instead of an elementwise mask); an overflowing sum of finite
            # values falls through to the elementwise test
            if not bool(value.sum().isfinite()) and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"Observed site '{name}' contains NaN or infinite values; clean or mask the "
                    "data (poutine.mask / obs_mask) before fitting."
                )


class DataPlateScaling(Messenger):
    """Make the plate ``plate_name`` a subsampled plate of full size ``full_size``.

    Inside the plate, each sample site's scale is multiplied by ``full_size / batch_size``
    (:math:`N/B`) and the plate's ``CondIndepStackFrame`` gets ``full_size = N``.

    Parameters
    ----------
    plate_name : str
        Name of the data plate of the model and guide (e.g. ``"data"``).
    full_size : int
        ``N``, the number of rows in the full (global) data set.
    batch_size : int
        ``B``, the number of rows the model and guide receive; the plate must have this size.

    Attributes
    ----------
    found : bool
        Whether any sample site inside the plate was seen.
    plates_seen : set of str
        Names of every plate seen (for the error message when ``plate_name`` is absent).

    Raises
    ------
    ValueError
        At a site whose plate ``plate_name`` has a size other than ``batch_size``, or is already
        subsampled by the model.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    >>> with DataPlateScaling("data", full_size=100, batch_size=10):
    ...     trace = pyro.poutine.trace(model).get_trace(torch.zeros(10))
    >>> trace.nodes["x"]["scale"], trace.nodes["x"]["cond_indep_stack"][0].full_size
    (10.0, 100)
    """

    def __init__(self, plate_name: str, full_size: int, batch_size: int) -> None:
        super().__init__()
        self.plate_name = plate_name
        self.full_size = int(full_size)
        self.batch_size = int(batch_size)
        self.found = False
        self.plates_seen: set[str] = set()

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample":
            return
        stack = msg["cond_indep_stack"]
        for position, frame in enumerate(stack):
            self.plates_seen.add(frame.name)
            if frame.name != self.plate_name:
                continue
            if frame.full_size not in (None, frame.size):
                raise ValueError(
                    f"`data_plate={self.plate_name!r}`: site {msg['name']!r} is in plate "
                    f"{self.plate_name!r}, which the model already subsamples (size "
                    f"{frame.full_size}, subsample {frame.size}); pass either `data_plate` or "
                    "the idx/n_data convention, not both"
                )
            if frame.size != self.batch_size:
                raise ValueError(
                    f"`data_plate={self.plate_name!r}`: site {msg['name']!r} is in plate "
                    f"{self.plate_name!r} of size {frame.size}, but the minibatch has "
                    f"{self.batch_size} rows; size the plate by the data it is given, e.g. "
                    f"pyro.plate({self.plate_name!r}, len(x))"
                )
            scaled = frame._replace(full_size=self.full_size)
            msg["cond_indep_stack"] = stack[:position] + (scaled,) + stack[position + 1 :]
            msg["scale"] = msg["scale"] * (self.full_size / self.batch_size)
            self.found = True
            return

    def check_found(self) -> None:
        """Raise when no sample site was inside the plate (a misspelt ``data_plate``).

        Raises
        ------
        ValueError
            Naming the plate and the plates that were seen.
        """
        if not self.found:
            seen = sorted(self.plates_seen) or "none"
            raise ValueError(
                f"`data_plate={self.plate_name!r}`: the model and guide have no sample site in a "
                f"plate named {self.plate_name!r} (plates seen: {seen}); pass the name of the "
                "plate over the rows of the data"
            )


__all__ = [
    "DataPlateScaling",
    "PARTICLE_PLATE",
    "ParticleRun",
    "ParticleVectorizationError",
    "ParticleWeights",
    "PointPlate",
    "SiteScore",
    "SubsamplingError",
    "check_finite_observations",
    "common_user_scale",
    "detached_guide_from_distributions",
    "guess_plate_nesting",
    "guide_structure",
    "latent_sites",
    "particle_plate",
    "sample_sites",
    "site_log_prob",
    "site_plate_frames",
    "site_subsample_factor",
    "site_user_scale",
    "trace_particles",
]
