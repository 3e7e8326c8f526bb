"""Shared trace and plate bookkeeping for every estimator and diagnostic.

Everything in the package needs the same thing from a model and a guide: ``K`` draws of the
latents (vectorized on a particle plate on the left) and, per draw and per data point,
``log p(x, z)`` and ``log q(z | x)``, with the subsampling factor ``N / B`` of the data plate kept
apart from a user's own :func:`pyro.poutine.scale`. This module owns that computation;
estimators never re-derive plate arithmetic.

Conventions
-----------
* The *point plates* are the vectorized plates shared by every sample site of the model and the
  guide (observed sites included). The importance-weighted bound is taken per element of those
  plates. With no shared plate the whole trace is one point.
* Per site, the unscaled log-density is multiplied by the site's *user scale*: its ``scale`` divided
  by the subsampling factors of its plates. When every site carries the same user scale it is not
  applied inside the log-weights but reported as part of :attr:`ParticleWeights.scale`, which also
  holds the subsampling factor of the point plates; estimators apply it after their log-mean-exp.
* A subsampled plate that is not a point plate (a latent outside the data plate, or a nested
  subsampled plate) makes a per-point bound impossible: :func:`trace_particles` raises.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from pyro_vi_ext.infer import _validation

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass(frozen=True)
class PointPlate:
    """A vectorized plate shared by every sample site: the data points of a per-point bound."""

    name: str
    dim: int
    size: int
    full_size: int

    @property
    def subsample_factor(self) -> float:
        return self.full_size / self.size


@dataclass
class ParticleWeights:
    """Per-particle, per-point log-densities of one vectorized model/guide run.

    Attributes
    ----------
    model_trace, guide_trace:
        The traces, subsample sites pruned. Guide values carry their reparameterized graph.
    num_particles:
        Total particles ``S`` on the particle plate.
    particle_dim:
        Negative dim of the particle plate in every site's batch shape.
    point_plates:
        The shared plates, ordered from left to right.
    log_p, log_q:
        ``[S, P]`` tensors: log p(x, z) and log q(z | x) per particle and point, user scale applied
        when it is not uniform. ``P`` is the product of the point plate sizes (1 for whole-trace).
        ``log_q`` is computed with detached guide parameters when asked for (STL, DReG).
    score:
        ``[S, P]`` sum of log q over guide sites without ``rsample`` (with gradient), or ``None``.
    scale:
        Multiplier applied after the per-point reduction: the subsampling factor of the point plates
        times the uniform user scale.
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

    @property
    def log_weights(self) -> torch.Tensor:
        """``[S, P]`` log importance weights ``log p(x, z) - log q(z | x)``."""
        return self.log_p - self.log_q

    @property
    def num_points(self) -> int:
        return self.log_p.shape[-1]

    @property
    def data_size(self) -> float:
        """Number of data points the estimate stands for (full sizes of the point plates)."""
        return float(math.prod(p.full_size for p in self.point_plates))

    def per_point_to_site(self, per_point: torch.Tensor, site: dict) -> torch.Tensor:
        """Reshape an ``[S, P]`` tensor so that it broadcasts against ``site["value"]``."""
        nesting = -self.particle_dim
        shape = [1] * nesting
        shape[0] = per_point.shape[0]
        for plate in self.point_plates:
            shape[nesting + plate.dim] = plate.size
        event_dim = site["fn"].event_dim
        return per_point.reshape(shape + [1] * event_dim)


def guess_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Run model and guide once (hidden from outer handlers) and return their plate nesting."""
    with poutine.block():
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
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and frame.full_size is not None and frame.name != PARTICLE_PLATE:
            factor *= frame.full_size / frame.size
    return factor


def site_plate_frames(site: dict) -> dict[str, object]:
    return {
        frame.name: frame
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE
    }


def sample_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            yield name, site


def latent_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    for name, site in sample_sites(trace):
        if not site["is_observed"]:
            yield name, site


def site_log_prob(site: dict) -> torch.Tensor:
    """Unscaled log-density of a site with its mask applied (zero where masked out)."""
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
    """
    return _as_number(_user_scale(site))


def common_user_scale(traces: Sequence[poutine.Trace]) -> float | None:
    """Return the user scale shared by every sample site of ``traces`` (``None`` if they differ).

    A trace without sample sites has the common scale 1.
    """
    scales = {site_user_scale(site) for trace in traces for _, site in sample_sites(trace)}
    if not scales:
        return 1.0
    if len(scales) > 1 or None in scales:
        return None
    return scales.pop()


def particle_plate(num_particles: int, plate_nesting: int) -> pyro.plate:
    """Return the vectorized particle plate, placed left of a model's ``plate_nesting`` dims."""
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


def _check_detachment(guide: Callable, wrapped_guide: Callable, trace: poutine.Trace, args, kwargs):
    """Once per guide: with detached values and parameters, log q must carry no gradient."""
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


def _check_subsampling(traces: Sequence[poutine.Trace], plates: tuple[PointPlate, ...]) -> None:
    point_names = {p.name for p in plates}
    subsampled = {}
    for trace in traces:
        for site_name, site in sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                # a sequential plate is never a point plate, and its N / B would pass for a user
                # scale: the minibatch estimate of the whole-trace bound would be silently biased
                if not frame.vectorized and frame.full_size not in (None, frame.size):
                    raise ValueError(
                        f"Plate '{frame.name}' is a subsampled sequential plate (site "
                        f"'{site_name}'). Importance-weighted bounds are per point only over "
                        "vectorized plates, and a whole-trace bound has no unbiased minibatch "
                        f"estimate. Use a vectorized 'with pyro.plate(\"{frame.name}\", ...)' or "
                        "pass the full data (no subsample_size)."
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
        where = ", ".join(f"{kind} site '{name}'" for kind, name in outside[:5])
        raise ValueError(
            f"Plate '{plate_name}' is subsampled, but {where} lie outside it. A per-data-point "
            "importance-weighted bound needs every sample site inside the subsampled data plate; "
            "with latents outside it the bound covers the whole dataset and no unbiased minibatch "
            f"estimate of it exists. Pass the full data to '{plate_name}' (no subsample_size), "
            "move those latents inside the plate, or use Trace_ELBO for them."
        )


def _reduce_to_points(
    log_prob: torch.Tensor, nesting: int, plates: tuple[PointPlate, ...], num_particles: int
) -> torch.Tensor:
    """Sum a site's batch log-density over every dim but the particle and point plates."""
    # pad to [S, d_-nesting+1, ..., d_-1]
    while log_prob.dim() < nesting:
        log_prob = log_prob.unsqueeze(0)
    keep = {0} | {nesting + p.dim for p in plates}
    reduce_dims = [d for d in range(nesting) if d not in keep and log_prob.shape[d] != 1]
    if reduce_dims:
        log_prob = log_prob.sum(reduce_dims, keepdim=True)
    shape = [num_particles] + [p.size for p in plates]
    squeezed = [log_prob.shape[0]] + [log_prob.shape[nesting + p.dim] for p in plates]
    return log_prob.reshape(squeezed).expand(shape).reshape(num_particles, -1)


def check_finite_observations(trace: poutine.Trace) -> None:
    for name, site in sample_sites(trace):
        value = site["value"]
        if site["is_observed"] and isinstance(value, torch.Tensor) and value.is_floating_point():
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"Observed site '{name}' contains NaN or infinite values; clean or mask the "
                    "data (poutine.mask / obs_mask) before fitting."
                )


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
) -> ParticleWeights:
    """Run ``guide`` and ``model`` once under a vectorized particle plate and collect log-weights.

    Parameters
    ----------
    num_particles:
        Size ``S`` of the particle plate, placed at dim ``-(plate_nesting + 1)``.
    plate_nesting:
        The model's own maximal plate nesting (without the particle plate).
    detach_guide_parameters:
        Compute ``log_q`` from a replay of the guide with detached parameters (STL, DReG), keeping
        the path derivative through the reparameterized latents.
    latent_hook:
        ``latent_hook(name, value)`` returns the tensor the model and the detached guide replay
        consume in place of each guide latent's value (DReG's aliases,
        :class:`~pyro_vi_ext.infer._gradients.DregAliases`).
    require_rsample:
        Name of the estimator that needs every guide site reparameterized; a site without
        ``rsample`` then raises.
    """
    particle_dim = -(plate_nesting + 1)

    def wrap(fn: Callable) -> Callable:
        return particle_plate(num_particles, plate_nesting)(fn)

    wrapped_guide, wrapped_model = wrap(guide), wrap(model)
    full_guide_trace = poutine.trace(wrapped_guide).get_trace(*args, **kwargs)
    model_source = full_guide_trace
    aliases: dict[str, torch.Tensor] = {}
    if latent_hook is not None:
        aliases = {
            name: latent_hook(name, site["value"]) for name, site in latent_sites(full_guide_trace)
        }
        model_source = _replay_trace(full_guide_trace, aliases)
    full_model_trace = poutine.trace(poutine.replay(wrapped_model, trace=model_source)).get_trace(
        *args, **kwargs
    )
    _validation.check_model_guide_traces(full_model_trace, full_guide_trace, plate_nesting)
    validate = is_validation_enabled()
    if validate:
        check_model_guide_match(full_model_trace, full_guide_trace, plate_nesting + 1)
    guide_trace = prune_subsample_sites(full_guide_trace)
    model_trace = prune_subsample_sites(full_model_trace)
    if validate:
        check_finite_observations(model_trace)

    for name, site in latent_sites(guide_trace):
        if site["infer"].get("enumerate"):
            raise ValueError(
                f"Guide site '{name}' asks for enumeration, which importance-weighted and "
                "decomposed ELBOs do not support; use TraceEnum_ELBO or remove infer['enumerate']."
            )
        if require_rsample and not site["fn"].has_rsample:
            raise ValueError(
                f"Guide site '{name}' ({type(site['fn']).__name__}) has no rsample, but the "
                f"'{require_rsample}' estimator differentiates through reparameterized samples. "
                "Use estimator='iwae' (score-function gradient for this site) or a "
                "reparameterizable guide distribution."
            )

    traces = (model_trace, guide_trace)
    plates = _point_plates(traces)
    _check_subsampling(traces, plates)

    detached_trace = None
    if detach_guide_parameters:
        if validate:
            _check_detachment(guide, wrapped_guide, full_guide_trace, args, kwargs)
        replay_source = _replay_trace(full_guide_trace, aliases) if aliases else full_guide_trace
        with poutine.block():
            with _DetachGuideParameters(guide):
                detached_trace = poutine.trace(
                    poutine.replay(wrapped_guide, trace=replay_source)
                ).get_trace(*args, **kwargs)
        detached_trace = prune_subsample_sites(detached_trace)

    nesting = plate_nesting + 1
    user_scales = [_user_scale(site) for t in traces for _, site in sample_sites(t)]
    numbers = [_as_number(s) for s in user_scales]
    uniform = all(n is not None for n in numbers) and len(set(numbers)) <= 1
    outer_user_scale = numbers[0] if (uniform and numbers) else 1.0

    def accumulate(trace: poutine.Trace, only: Callable[[dict], bool] | None = None):
        total = None
        for _, site in sample_sites(trace):
            if only is not None and not only(site):
                continue
            log_prob = site_log_prob(site)
            if validate:
                check_site_shape({**site, "log_prob": log_prob}, nesting)
            if not uniform:
                log_prob = log_prob * _user_scale(site)
            reduced = _reduce_to_points(log_prob, nesting, plates, num_particles)
            total = reduced if total is None else total + reduced
        if total is None:
            size = math.prod(p.size for p in plates)
            total = torch.zeros(num_particles, size)
        return total

    log_p = accumulate(model_trace)
    log_q = accumulate(detached_trace if detached_trace is not None else guide_trace)
    score = None
    if any(not site["fn"].has_rsample for _, site in latent_sites(guide_trace)):
        score = accumulate(
            guide_trace, only=lambda s: not s["is_observed"] and not s["fn"].has_rsample
        )

    scale = outer_user_scale * math.prod(p.subsample_factor for p in plates)
    return ParticleWeights(
        model_trace=model_trace,
        guide_trace=guide_trace,
        num_particles=num_particles,
        particle_dim=particle_dim,
        point_plates=plates,
        log_p=log_p,
        log_q=log_q,
        score=score,
        scale=scale,
    )


__all__ = [
    "PARTICLE_PLATE",
    "ParticleWeights",
    "PointPlate",
    "check_finite_observations",
    "common_user_scale",
    "guess_plate_nesting",
    "latent_sites",
    "particle_plate",
    "sample_sites",
    "site_log_prob",
    "site_subsample_factor",
    "site_user_scale",
    "trace_particles",
]
