"""Checks that turn silent wrong numbers and raw Pyro/torch errors into errors that say what to do.

Every loss of the package rests on one model run replayed against one guide run under a particle
plate. A model latent the guide never samples, a plate whose size differs between model and guide,
a guide site of the wrong shape, a plate that collides with the particle plate, an empty batch or a
number of particles that cannot fit in memory: each either gives a wrong bound without a word or
fails deep inside Pyro or torch. The functions here name the site, plate or argument at fault.

Two kinds of check live here:

* trace checks (:func:`check_model_guide_traces`) read only the metadata of the two traces (names,
  shapes, plate frames); they cost a few microseconds per call and run on every trace, because
  plate sizes and shapes can change from one call to the next with the data;
* checks that need an extra model/guide run (:func:`check_particle_memory`) run once per
  model/guide pair and particle count, cached on the loss instance, and error translation
  (:func:`explain_trace_error`) runs only on the error path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import types
from collections.abc import Callable, Iterator
from itertools import zip_longest
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.messenger import Messenger

# module import: _weights calls back into this module (no name is needed at import time)
from pyro_vi_ext.infer import _weights

__all__ = [
    "ModelGuideMismatchError",
    "ParticleChunkingError",
    "ParticleMemoryError",
    "PlateNestingError",
    "available_memory_bytes",
    "check_constructor_arguments",
    "check_elbo_instance",
    "check_guide_samples_model_latents",
    "check_model_guide_traces",
    "check_particle_memory",
    "check_plate_sizes_agree",
    "check_plates_within_nesting",
    "check_site_shapes_agree",
    "estimate_particle_bytes",
    "explain_trace_error",
    "guarded_differentiable_loss",
]


class ModelGuideMismatchError(ValueError):
    """The model and the guide disagree on a site, a plate or a shape; the bound would be wrong."""


class PlateNestingError(ModelGuideMismatchError):
    """A model plate sits at or left of the particle plate: ``max_plate_nesting`` is too small."""


class ParticleMemoryError(MemoryError):
    """The requested particles cannot fit in the memory of the device that holds the traces."""


class ParticleChunkingError(ValueError):
    """A loss's ``particle_chunk_size`` cannot serve this call or this configuration."""


# -- loss objects ---------------------------------------------------------------------------------
def check_elbo_instance(obj: object, method: str) -> None:
    """Raise when a loss method was called on the class rather than on an instance.

    ``SomeELBO.loss(model, guide, x)`` binds ``self`` to the model; this names the mistake instead
    of failing later on a missing attribute.

    Parameters
    ----------
    obj : object
        What the method received as ``self``.
    method : str
        The method's name, for the message.

    Raises
    ------
    TypeError
        If ``obj`` is not an :class:`pyro.infer.ELBO` instance.

    Examples
    --------
    >>> from pyro.infer import Trace_ELBO
    >>> check_elbo_instance(Trace_ELBO(), "loss")
    """
    if not isinstance(obj, ELBO):
        raise TypeError(
            f"An ELBO's '{method}' was called with {_describe(obj)} as 'self': the method was "
            "called on the loss class instead of an instance. Pass an instance, e.g. "
            "ImportanceWeightedELBO(num_particles=10), not the class ImportanceWeightedELBO."
        )


def check_constructor_arguments(cls: type, args: tuple, kwargs: dict) -> None:
    """Raise when a loss class is being called like a loss, as ``SVI(..., loss=TheClass)`` does.

    ``pyro.infer.SVI`` treats a loss that is not an ``ELBO`` instance as a plain function and calls
    it as ``loss(model, guide, *args, **kwargs)``; for a class that is a constructor call with the
    model as first parameter. The call is recognized when the first two positional arguments are
    callables and either (a) the first parameter's default is an ``int`` or ``str`` (no callable
    can be meant), (b) a later argument is a tensor (model data), (c) a keyword is not a
    parameter of the class, or (d) one of the two callables cannot be called with a single step
    argument (a weight schedule can).

    Parameters
    ----------
    cls : type
        The loss class being constructed.
    args, kwargs : tuple, dict
        The constructor's arguments.

    Raises
    ------
    TypeError
        If the arguments look like ``(model, guide, *model_args)``.

    Examples
    --------
    >>> from pyro_vi_ext import ImportanceWeightedELBO
    >>> check_constructor_arguments(ImportanceWeightedELBO, (10,), {})
    """
    if len(args) < 2 or not all(_is_program(fn) for fn in args[:2]):
        return
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    first_default = parameters[0].default if parameters else inspect.Parameter.empty
    looks_like_a_loss_call = (
        isinstance(first_default, (int, str))
        and not isinstance(first_default, bool)
        or any(isinstance(value, torch.Tensor) for value in (*args[2:], *kwargs.values()))
        or not set(kwargs) <= {parameter.name for parameter in parameters}
        or not all(_accepts_one_argument(fn) for fn in args[:2])
    )
    if looks_like_a_loss_call:
        name = cls.__name__
        raise TypeError(
            f"{name} was called with a model and a guide ({_describe(args[0])}, "
            f"{_describe(args[1])}) as constructor arguments: the loss class was passed where an "
            f"instance is expected (SVI(model, guide, optim, loss={name}) calls the class like a "
            f"loss). Pass an instance: loss={name}(...), e.g. {name}(num_particles=10)."
        )


def _is_program(obj: object) -> bool:
    return callable(obj) and not isinstance(obj, (type, int, float, str, torch.Tensor))


def _accepts_one_argument(fn: Callable) -> bool:
    if isinstance(fn, torch.nn.Module):
        return False
    try:
        inspect.signature(fn).bind(0)
    except (TypeError, ValueError):
        return False
    return True


def _describe(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"'{name}'"


# -- trace checks ---------------------------------------------------------------------------------
def _sample_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample":
            yield name, site


def _contributes_nothing(site: dict) -> bool:
    mask = site["mask"]
    if mask is False:
        return True
    return isinstance(mask, torch.Tensor) and not bool(mask.any())


def _is_enumerated(site: dict) -> bool:
    infer = site["infer"]
    return bool(infer.get("enumerate")) or infer.get("_enumerate_dim") is not None


def _quoted(names) -> str:
    return ", ".join(f"'{name}'" for name in names) or "none"


def check_guide_samples_model_latents(
    model_trace: poutine.Trace, guide_trace: poutine.Trace
) -> None:
    """Raise when a latent site of the model is not sampled by the guide.

    The replayed model then draws that latent from its prior, so ``log p(x, z)`` contains its
    density but ``log q(z | x)`` does not: every importance weight, and the bound, is wrong.
    Exempt: observed sites (``pyro.deterministic`` included), model-side enumerated sites
    (``infer={"enumerate": ...}``, summed out by the model) and sites masked out entirely (their
    density is not counted, e.g. the ``<name>_unobserved`` site of ``obs_mask`` when nothing is
    missing).

    Parameters
    ----------
    model_trace, guide_trace : pyro.poutine.Trace
        The replayed model's trace and the guide's trace.

    Raises
    ------
    ModelGuideMismatchError
        Naming the model sites the guide misses and the guide's own sample sites.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> trace = poutine.trace(model).get_trace()
    >>> check_guide_samples_model_latents(trace, trace)
    """
    guide_sites = [name for name, site in _sample_sites(guide_trace) if not site["is_observed"]]
    sampled = set(guide_sites)
    missing = [
        name
        for name, site in _sample_sites(model_trace)
        if not site["is_observed"]
        and name not in sampled
        and not _is_enumerated(site)
        and not _contributes_nothing(site)
    ]
    if not missing:
        return
    model_names = set(model_trace.nodes)
    extra = [
        name
        for name, site in _sample_sites(guide_trace)
        if name not in model_names
        and not site["infer"].get("is_auxiliary")
        and not site["is_observed"]
    ]
    hint = (
        f" The guide samples {_quoted(extra)}, which the model does not have: a misnamed site?"
        if extra
        else ""
    )
    raise ModelGuideMismatchError(
        f"Model latent site(s) {_quoted(missing)} are not sampled by the guide (guide sample "
        f"sites: {_quoted(guide_sites)}).{hint} The model would draw them from the prior while "
        "the importance weights leave out their proposal density, so the bound would be wrong. "
        "Sample every model latent in the guide under the same name (for obs_mask, sample "
        "'<name>_unobserved'), observe it in the model, or mark a discrete model site "
        "infer={'enumerate': 'parallel'} where the loss supports enumeration."
    )


def _plate_description(frame) -> str:
    if frame.full_size is not None and frame.full_size != frame.size:
        return f"size {frame.full_size} subsampled to {frame.size}"
    return f"size {frame.size}"


def check_plate_sizes_agree(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> None:
    """Raise when a plate has a different size, full size or dim in the model and the guide.

    Compared at every latent site that both programs sample, plate by plate (by name). A plate of
    32 in the guide and of 1000 in the model gives the two programs different subsampling factors
    ``N / B``: the losses would scale the two halves of the weights differently.

    Parameters
    ----------
    model_trace, guide_trace : pyro.poutine.Trace
        The replayed model's trace and the guide's trace.

    Raises
    ------
    ModelGuideMismatchError
        Naming the plate, the site and both sizes.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> def model():
    ...     with pyro.plate("data", 3):
    ...         pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> trace = poutine.trace(model).get_trace()
    >>> check_plate_sizes_agree(trace, trace)
    """
    for name, guide_site in _sample_sites(guide_trace):
        model_site = model_trace.nodes.get(name)
        if model_site is None or model_site["type"] != "sample":
            continue
        model_frames = {f.name: f for f in model_site["cond_indep_stack"]}
        for guide_frame in guide_site["cond_indep_stack"]:
            model_frame = model_frames.get(guide_frame.name)
            if model_frame is None or guide_frame.name == _weights.PARTICLE_PLATE:
                continue
            if (model_frame.size, model_frame.full_size) != (
                guide_frame.size,
                guide_frame.full_size,
            ):
                raise ModelGuideMismatchError(
                    f"Plate '{guide_frame.name}' has {_plate_description(model_frame)} in the "
                    f"model but {_plate_description(guide_frame)} in the guide (at site "
                    f"'{name}'). Model and guide must declare the plate with the same size and "
                    f"subsample: pass the same size (the dataset size N) and the same "
                    f"subsample/subsample_size to pyro.plate('{guide_frame.name}', ...) in both."
                )
            if model_frame.vectorized and model_frame.dim != guide_frame.dim:
                raise ModelGuideMismatchError(
                    f"Plate '{guide_frame.name}' sits at dim {model_frame.dim} in the model but "
                    f"at dim {guide_frame.dim} in the guide (at site '{name}'), so the guide's "
                    f"values would be read along the wrong axis. Give the plate the same dim= in "
                    "both, or nest the plates in the same order."
                )


def _without_particle_dim(shape: torch.Size, event_dim: int, nesting: int) -> tuple[int, ...]:
    batch = tuple(shape[: len(shape) - event_dim]) if event_dim else tuple(shape)
    if len(batch) >= nesting + 1:
        batch = batch[len(batch) - nesting :]
    return batch


def check_site_shapes_agree(
    model_trace: poutine.Trace, guide_trace: poutine.Trace, plate_nesting: int
) -> None:
    """Raise when a site's event shape, or its batch shape inside the plates, differs.

    The event shapes must be equal; the batch shapes must be equal over the rightmost
    ``plate_nesting + 1`` dims (the model's plates and the particle plate), Pyro's own rule.
    Shapes in the message leave the particle dim out.

    Parameters
    ----------
    model_trace, guide_trace : pyro.poutine.Trace
        The replayed model's trace and the guide's trace.
    plate_nesting : int
        The model's plate nesting, without the particle plate.

    Raises
    ------
    ModelGuideMismatchError
        Naming the site, both batch and event shapes and what to change.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    >>> trace = poutine.trace(model).get_trace()
    >>> check_site_shapes_agree(trace, trace, plate_nesting=0)
    """
    for name, guide_site in _sample_sites(guide_trace):
        model_site = model_trace.nodes.get(name)
        if model_site is None or model_site["type"] != "sample" or model_site["is_observed"]:
            continue
        _check_site_shape(name, model_site, guide_site, plate_nesting)


def _check_site_shape(name: str, model_site: dict, guide_site: dict, plate_nesting: int) -> None:
    """Compare one site's distributions in the model and the guide (see check_site_shapes_agree)."""
    nesting = plate_nesting + 1
    model_fn, guide_fn = model_site["fn"], guide_site["fn"]
    if not all(hasattr(fn, "batch_shape") for fn in (model_fn, guide_fn)):
        return
    model_event, guide_event = tuple(model_fn.event_shape), tuple(guide_fn.event_shape)
    model_batch = tuple(model_fn.batch_shape)[-nesting:]
    guide_batch = tuple(guide_fn.batch_shape)[-nesting:]
    batch_agree = all(
        m == g for m, g in zip_longest(reversed(model_batch), reversed(guide_batch), fillvalue=1)
    )
    if model_event == guide_event and batch_agree:
        return
    shown_model = _without_particle_dim(model_fn.batch_shape, 0, plate_nesting)
    shown_guide = _without_particle_dim(guide_fn.batch_shape, 0, plate_nesting)
    shapes = (
        f"the model's distribution has batch shape {shown_model} and event shape "
        f"{model_event}, the guide's has batch shape {shown_guide} and event shape "
        f"{guide_event}"
    )
    if model_event != guide_event:
        if math.prod(model_event) * math.prod(shown_model) == math.prod(guide_event) * math.prod(
            shown_guide
        ):
            todo = (
                "The sizes match but are split differently between batch and event dims: "
                f"declare the same event dims in both, e.g. .to_event({len(model_event)}) on "
                "the guide's distribution."
            )
        else:
            todo = (
                f"Size the guide's parameters at '{name}' for event shape {model_event} (and "
                "mark event dims with .to_event(n) as in the model)."
            )
    else:
        model_plates = [f.name for f in model_site["cond_indep_stack"] if f.vectorized]
        guide_plates = [f.name for f in guide_site["cond_indep_stack"] if f.vectorized]
        model_plates = [p for p in model_plates if p != _weights.PARTICLE_PLATE]
        guide_plates = [p for p in guide_plates if p != _weights.PARTICLE_PLATE]
        todo = (
            f"The model samples it in plates {_quoted(model_plates)}, the guide in plates "
            f"{_quoted(guide_plates)}: sample '{name}' in the guide inside the same plates, "
            "with parameters broadcastable to the model's batch shape."
        )
    raise ModelGuideMismatchError(f"Site '{name}': {shapes}. {todo}")


def check_plates_within_nesting(traces, plate_nesting: int) -> None:
    """Raise when a vectorized plate sits at or left of the particle plate's dim.

    The particle plate is placed at dim ``-(plate_nesting + 1)``; a model plate further left
    (e.g. ``dim=-3`` with ``max_plate_nesting=1``) would be mixed up with the particles.

    Parameters
    ----------
    traces : sequence of pyro.poutine.Trace
        The model's and the guide's traces.
    plate_nesting : int
        The plate nesting the loss uses, without the particle plate.

    Raises
    ------
    PlateNestingError
        Naming the deepest plate and its dim (the losses then name the value to pass, found by
        :func:`explain_trace_error`).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> def model():
    ...     with pyro.plate("data", 3):
    ...         pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> check_plates_within_nesting([poutine.trace(model).get_trace()], plate_nesting=1)
    """
    deepest = None
    for trace in traces:
        for site_name, site in _sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized or frame.name == _weights.PARTICLE_PLATE:
                    continue
                if frame.dim < -plate_nesting and (deepest is None or frame.dim < deepest[1]):
                    deepest = (frame.name, frame.dim, site_name)
    if deepest is not None:
        plate, dim, site = deepest
        raise PlateNestingError(
            f"max_plate_nesting={plate_nesting} is too small: plate '{plate}' (site '{site}') "
            f"sits at dim {dim}, left of the particle plate at dim {-(plate_nesting + 1)}, which "
            "must be left of every model plate. Pass the model's own plate nesting (the number "
            "of dims its plates use, without the particle plate) as max_plate_nesting, or leave "
            "it None to let the loss find it."
        )


def _nesting_message(plate_nesting: int, plate: str, dim: int, site: str) -> str:
    return (
        f"max_plate_nesting={plate_nesting} is too small: plate '{plate}' (site '{site}') uses "
        f"dim {dim} when the model runs without particles, but the loss puts its particle plate "
        f"at dim {-(plate_nesting + 1)}, which must be left of every model plate. Pass "
        f"max_plate_nesting={-dim} (the model's own nesting, without the particle plate), or "
        "leave it None to let the loss find it."
    )


def check_model_guide_traces(
    model_trace: poutine.Trace, guide_trace: poutine.Trace, plate_nesting: int
) -> None:
    """Run every trace check on a model trace replayed against a guide trace.

    The checks read only site metadata (no tensor arithmetic except a mask look-up for a missing
    latent), so they run on every trace, with or without Pyro's validation.

    Parameters
    ----------
    model_trace, guide_trace : pyro.poutine.Trace
        The replayed model's trace and the guide's trace, both under the particle plate.
    plate_nesting : int
        The model's plate nesting, without the particle plate.

    Raises
    ------
    ModelGuideMismatchError
        From :func:`check_plates_within_nesting`, :func:`check_guide_samples_model_latents`,
        :func:`check_plate_sizes_agree` or :func:`check_site_shapes_agree`.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> trace = poutine.trace(model).get_trace()
    >>> check_model_guide_traces(trace, trace, plate_nesting=0)
    """
    check_plates_within_nesting((model_trace, guide_trace), plate_nesting)
    check_guide_samples_model_latents(model_trace, guide_trace)
    check_plate_sizes_agree(model_trace, guide_trace)
    check_site_shapes_agree(model_trace, guide_trace, plate_nesting)


# -- memory ---------------------------------------------------------------------------------------
def available_memory_bytes(device: torch.device) -> int | None:
    """Return the memory that can still be allocated on ``device``, or ``None`` if unknown.

    CUDA: the free memory from :func:`torch.cuda.mem_get_info`. CPU: ``MemAvailable`` from
    ``/proc/meminfo`` (Linux); ``None`` elsewhere.

    Parameters
    ----------
    device : torch.device
        Where the traces' tensors live.

    Returns
    -------
    int or None
        Free bytes.

    Examples
    --------
    >>> free = available_memory_bytes(torch.device("cpu"))
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def estimate_particle_bytes(
    traces, num_probe_particles: int, plate_nesting: int
) -> tuple[int, torch.device]:
    r"""Estimate the bytes one particle needs, from traces taken with a few particles.

    For every sample site whose distribution carries the particle dim, count two tensors of the
    distribution's full shape (batch and event) per particle, e.g. the value or a parameter and
    the elementwise log-density:

    .. math:: b = \sum_{\text{sites}} 2 \, \frac{|\text{batch}| \, |\text{event}|}{S_{probe}}
        \times \text{bytes per element}.

    Network activations and autograd buffers come on top, so this is a lower bound: a run it
    refuses cannot fit.

    Parameters
    ----------
    traces : sequence of pyro.poutine.Trace
        Model and guide traces taken under a particle plate of ``num_probe_particles``.
    num_probe_particles : int
        Size of that particle plate.
    plate_nesting : int
        The model's plate nesting, without the particle plate.

    Returns
    -------
    tuple of (int, torch.device)
        Bytes per particle, and the device of the largest per-particle site.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> def model():
    ...     with pyro.plate("particles", 2, dim=-1):
    ...         pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    >>> estimate_particle_bytes([poutine.trace(model).get_trace()], 2, 0)[0]
    24
    """
    total, largest, device = 0, -1, torch.device("cpu")
    for trace in traces:
        for _, site in _sample_sites(trace):
            fn, value = site["fn"], site["value"]
            batch = tuple(getattr(fn, "batch_shape", ()))
            if len(batch) < plate_nesting + 1 or batch[-(plate_nesting + 1)] != num_probe_particles:
                continue
            numel = math.prod(batch) * math.prod(getattr(fn, "event_shape", ()))
            itemsize = value.element_size() if isinstance(value, torch.Tensor) else 4
            site_bytes = 2 * numel * itemsize // num_probe_particles
            total += site_bytes
            if site_bytes > largest and isinstance(value, torch.Tensor):
                largest, device = site_bytes, value.device
    return total, device


def check_particle_memory(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    plate_nesting: int,
    available: Callable[[torch.device], int | None] = available_memory_bytes,
    chunkable: bool = False,
) -> None:
    """Raise before allocating when ``num_particles`` particles cannot fit in memory.

    Traces guide and model once with two particles (hidden from outer handlers), estimates the
    bytes per particle with :func:`estimate_particle_bytes`, and compares ``num_particles`` times
    that with the free memory of the device.

    Parameters
    ----------
    model, guide : callable
        The Pyro programs.
    args, kwargs : tuple, dict
        Their arguments.
    num_particles : int
        Particles drawn in one vectorized run (``num_particles * num_outer`` for MIWAE).
    plate_nesting : int
        The model's plate nesting, without the particle plate.
    available : callable, optional
        Free bytes of a device (defaults to :func:`available_memory_bytes`).
    chunkable : bool
        The loss offers ``particle_chunk_size`` (exact chunking of the particles); the error then
        suggests it.

    Raises
    ------
    ParticleMemoryError
        With the estimate, the limit and what to do.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> check_particle_memory(model, model, (), {}, num_particles=10, plate_nesting=0)
    """
    probe = 2
    try:
        with _side_effect_free():
            plate = _weights.particle_plate(probe, plate_nesting)
            guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    except Exception:  # noqa: BLE001 - e.g. a guide replayed from fixed draws: no estimate
        return
    per_particle, device = estimate_particle_bytes((model_trace, guide_trace), probe, plate_nesting)
    needed = per_particle * num_particles
    limit = available(device)
    if limit is None or needed <= limit:
        return
    fitting = max(1, limit // max(per_particle, 1))
    chunking = (
        f"particle_chunk_size={fitting} or less (the same particles, value and gradient, "
        f"{fitting} at a time, about twice the forward cost), "
        if chunkable
        else ""
    )
    raise ParticleMemoryError(
        f"{num_particles} vectorized particles need at least {_gib(needed)} on {device} (about "
        f"{_gib(per_particle)} per particle, estimated from a two-particle run of the model and "
        f"the guide), but only {_gib(limit)} is available. Use {chunking}fewer particles per run "
        f"(at most about {fitting}), use a smaller batch, or vectorize_particles=False (one "
        "particle at a time)."
    )


@contextlib.contextmanager
def _side_effect_free() -> Iterator[None]:
    """Run a probe that leaves the random streams and the param store as they were.

    The torch generators (CPU and initialized CUDA devices) are restored, and parameters the probe
    created are removed, so the run that follows draws exactly what it would have drawn without
    the probe (seeded results and first-call initializations do not change).
    """
    store = pyro.get_param_store()
    existing = set(store.keys())
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices), poutine.block():
            yield
    finally:
        for name in set(store.keys()) - existing:
            del store[name]


def _gib(num_bytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 2**power:
            return f"{num_bytes / 2**power:.3g} {unit}"
    return f"{num_bytes} bytes"


# -- error translation ----------------------------------------------------------------------------
def _plate_in_traceback(error: BaseException) -> str | None:
    """Return the name of the innermost Pyro plate whose code raised ``error``, if any."""
    name = None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        local = frame.f_locals
        owner = local.get("self")
        if frame.f_code.co_name in ("__init__", "_subsample") and isinstance(
            local.get("name"), str
        ):
            if isinstance(owner, IndepMessenger) or frame.f_code.co_name == "_subsample":
                name = local["name"]
        elif isinstance(owner, IndepMessenger) and isinstance(getattr(owner, "name", None), str):
            name = owner.name
        tb = tb.tb_next
    return name


def _empty_arguments(args: tuple, kwargs: dict) -> list[str]:
    described = [(f"positional argument {i}", value) for i, value in enumerate(args)]
    described += [(f"argument '{key}'", value) for key, value in kwargs.items()]
    return [
        f"{label} of shape {tuple(value.shape)}"
        for label, value in described
        if isinstance(value, torch.Tensor) and value.numel() == 0 and value.dim() > 0
    ]


def _deepest_plate(model: Callable, guide: Callable, args, kwargs) -> tuple[str, int, str] | None:
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    deepest = None
    for trace in (model_trace, guide_trace):
        for site_name, site in _sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and (deepest is None or frame.dim < deepest[1]):
                    deepest = (frame.name, frame.dim, site_name)
    return deepest


class _CheckReplayedShapes(Messenger):
    """While the model replays a guide trace, compare each latent's shapes before it is used."""

    def __init__(self, guide_trace: poutine.Trace, plate_nesting: int):
        super().__init__()
        self._guide_trace = guide_trace
        self._plate_nesting = plate_nesting

    def _pyro_sample(self, msg) -> None:
        guide_site = self._guide_trace.nodes.get(msg["name"])
        if msg["is_observed"] or guide_site is None or guide_site["type"] != "sample":
            return
        _check_site_shape(msg["name"], msg, guide_site, self._plate_nesting)


def _diagnose_shapes(model, guide, args, kwargs, plate_nesting: int) -> Exception | None:
    """Re-run guide and model (two particles) and catch a shape mismatch where it starts."""
    plate = _weights.particle_plate(2, plate_nesting)
    try:
        with _side_effect_free():
            guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
            # outside the particle plate, so that every plate has broadcast the site first
            checked = _CheckReplayedShapes(guide_trace, plate_nesting)(plate(model))
            poutine.replay(checked, trace=guide_trace)(*args, **kwargs)
    except ModelGuideMismatchError as mismatch:
        return mismatch
    except Exception:  # fails for another reason: keep the original error
        return None
    return None


_PLATE_SHAPE = re.compile(r"Shape mismatch inside plate\('(.+?)'\) at site (\S+) dim (-?\d+)")


def _explain_plate_shape(error: BaseException, plate_nesting: float) -> Exception | None:
    found = _PLATE_SHAPE.search(str(error))
    if found is None:
        return None
    plate, site, dim = found[1], found[2], int(found[3])
    if plate == _weights.PARTICLE_PLATE:
        why = (
            f"Site '{site}': its distribution has a batch dim at dim {dim}, where the loss puts "
            f"its particle plate (max_plate_nesting={plate_nesting}): its batch shape has more "
            "dims than the plates around it. Mark the extra dims as event dims with "
            ".to_event(n), or pass a larger max_plate_nesting if they are plates"
        )
    else:
        why = (
            f"Site '{site}': its distribution has a batch dim at dim {dim} that does not match "
            f"the size of plate '{plate}' there. The rightmost batch dims belong to the plates: "
            "mark the site's own dims as event dims with .to_event(n) (the model and the guide "
            "must agree on the event shape), or size the parameters for the plate"
        )
    return ModelGuideMismatchError(f"{why}. ({str(error).splitlines()[0]})")


def explain_trace_error(
    error: BaseException,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    plate_nesting: float,
    generic: bool = True,
) -> Exception | None:
    """Return a clearer error for a failure inside a loss, or ``None`` to keep the original.

    Recognized: a plate of size zero (an empty batch), a subsample size that differs between
    model and guide, ``plate_nesting`` too small for the model's plates and the particle plate
    (diagnosed by one run of model and guide without the particle plate), a guide latent whose
    shapes break the model before the traces are complete (diagnosed by re-running the model with
    each replayed latent's shapes compared as it is sampled), and Pyro's "shape mismatch inside
    plate" (explained). The diagnosing runs happen on the error path only and leave the random
    streams and the param store as they were.

    Parameters
    ----------
    error : BaseException
        What the loss raised.
    model, guide : callable
        The Pyro programs.
    args, kwargs : tuple, dict
        Their arguments.
    plate_nesting : float
        The nesting the loss used (``inf`` while it was still to be guessed).
    generic : bool
        Also explain Pyro's "shape mismatch inside plate" when no specific cause is found.

    Returns
    -------
    Exception or None
        The error to raise from ``error``.

    Examples
    --------
    >>> explain_trace_error(KeyError("x"), print, print, (), {}, 1) is None
    True
    """
    if isinstance(error, (ParticleMemoryError, ParticleChunkingError, TypeError)) or (
        isinstance(error, ModelGuideMismatchError) and not isinstance(error, PlateNestingError)
    ):
        return None
    plate = _plate_in_traceback(error)
    if isinstance(error, ZeroDivisionError) and plate is not None:
        empty = _empty_arguments(args, kwargs)
        found = f" ({'; '.join(empty)})" if empty else ""
        return ValueError(
            f"Plate '{plate}' has no elements: the batch is empty{found}. A bound over zero data "
            "points is undefined; skip empty batches (e.g. check len(batch) > 0 or drop the last "
            "short batch of the loader)."
        )
    if isinstance(error, ValueError) and "subsample_size does not match" in str(error):
        where = f"Plate '{plate}'" if plate is not None else "A plate"
        sizes = re.search(r"(\d+) vs (\d+)", str(error))
        # raised while the model replays the guide's indices: the model's size comes first
        found = (
            f"subsample size {sizes[1]} in the model but {sizes[2]} in the guide"
            if sizes
            else "a different subsample size in the model and in the guide"
        )
        return ModelGuideMismatchError(
            f"{where} has {found}. Pass the same subsample_size (or the same subsample indices) "
            "to the plate in both."
        )
    explain_plate_shape = _explain_plate_shape if generic else (lambda error, nesting: None)
    if plate_nesting == math.inf:
        return explain_plate_shape(error, plate_nesting)
    try:
        deepest = _deepest_plate(model, guide, args, kwargs)
    except Exception:  # the programs fail on their own: keep the original error
        deepest = None
    if deepest is not None and -deepest[1] > plate_nesting:
        return ModelGuideMismatchError(_nesting_message(int(plate_nesting), *deepest))
    shapes = _diagnose_shapes(model, guide, args, kwargs, int(plate_nesting))
    return shapes if shapes is not None else explain_plate_shape(error, plate_nesting)


def guarded_differentiable_loss(method: Callable) -> Callable:
    """Wrap a loss's ``differentiable_loss`` with the instance, memory and error checks.

    The wrapped method refuses a call on the class (:func:`check_elbo_instance`), checks the
    particle memory once per model/guide pair and particle count (:func:`check_particle_memory`,
    cached in the loss's ``_checked_memory``), and replaces raw errors it recognizes with
    :func:`explain_trace_error`.

    Parameters
    ----------
    method : callable
        ``differentiable_loss(self, model, guide, *args, **kwargs)``.

    Returns
    -------
    callable
        The wrapped method.

    Examples
    --------
    >>> class Loss(ELBO):
    ...     @guarded_differentiable_loss
    ...     def differentiable_loss(self, model, guide, *args, **kwargs):
    ...         return torch.zeros(())
    """
    if getattr(method, "_pyro_vi_ext_guarded", False):
        return method

    @functools.wraps(method)
    def differentiable_loss(self, model, guide, *args, **kwargs):
        check_elbo_instance(self, "differentiable_loss")
        try:
            _check_memory_once(self, model, guide, args, kwargs)
            compiled = getattr(self, "_compiled", None)
            if compiled is not None and not getattr(self, "tracing", False):
                return compiled(self, method, model, guide, args, kwargs)
            return method(self, model, guide, *args, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            nesting = getattr(self, "max_plate_nesting", math.inf)
            # a vectorization error already names the site and suggests the sequential path:
            # replace it only by a specific diagnosis (wrong nesting, mismatched site shapes)
            generic = not isinstance(error, _weights.ParticleVectorizationError)
            explained = explain_trace_error(error, model, guide, args, kwargs, nesting, generic)
            if explained is None:
                raise
            raise explained from error

    differentiable_loss._pyro_vi_ext_guarded = True
    return differentiable_loss


def _program_key(fn: Callable) -> object:
    """Return a key that is equal on every call for the same program (bound methods too)."""
    key = (fn.__self__, fn.__func__) if isinstance(fn, types.MethodType) else fn
    try:
        hash(key)
    except TypeError:
        return id(fn)
    return key


def _check_memory_once(loss, model, guide, args, kwargs) -> None:
    vectorized = getattr(loss, "vectorize_particles", True)
    total = loss.num_particles * getattr(loss, "num_outer", 1)
    chunk_size = getattr(loss, "particle_chunk_size", None)
    if chunk_size is not None:  # chunked: one run holds at most chunk_size particles
        total = min(total, chunk_size)
    if not vectorized or total <= 1:
        return
    checked = getattr(loss, "_checked_memory", None)
    key = (_program_key(model), _program_key(guide), total)
    if checked is not None and key in checked:
        return
    nesting = loss._model_plate_nesting(model, guide, args, kwargs)
    check_particle_memory(
        model,
        guide,
        args,
        kwargs,
        num_particles=total,
        plate_nesting=nesting,
        chunkable=hasattr(loss, "particle_chunk_size"),
    )
    if checked is not None:
        checked.add(key)
