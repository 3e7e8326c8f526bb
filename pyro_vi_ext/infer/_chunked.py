r"""Exact particle chunking for the bound losses: the memory of ``C`` particles, the same gradient.

A :class:`~pyro_vi_ext.infer._loss_base.BoundELBO` with ``particle_chunk_size=C`` evaluates its
``S = M K`` particles ``C`` at a time. The value and the gradient equal those of the unchunked loss
on the same draws, because every estimator of the package is linear in per-particle quantities
once the bound's coefficients are known:

.. math::

    \nabla \hat{\mathcal L} = \frac{s}{M} \sum_{m,k,n} \Big[
        \mathrm{sg}(c_{m,k,n}) \, \nabla \log w_{m,k,n}
        + \mathrm{sg}(\sigma_{m,k,n}) \, \nabla \log q(z_{m,k,n})^{\text{non-reparam}} \Big],

with :math:`s` the subsampling and user scale of the points, :math:`c = \partial f/\partial \log w`
the bound's particle weights (``Bound.particle_weights``: the normalized weights :math:`\tilde w`
for IWAE [1]_) and :math:`\sigma` the leave-one-out signals of the score-function sites [3]_
(:func:`~pyro_vi_ext.infer._gradients.leave_one_out_signals`; with one particle per bound, the
particle's own Rao-Blackwellized signals). DReG [2]_ also rescales the gradient reaching each
latent from :math:`c` to the path weight (``Bound.path_weights``: :math:`\tilde w^2` for IWAE).
All coefficients depend on the log-weights of *every* particle, hence two passes:

1. under :func:`torch.no_grad`, each chunk is traced and its ``[C, P]`` log-weights kept, after
   recording the random state (torch's CPU and CUDA generators, Python's :mod:`random`, NumPy's
   global generator); the value, the reported terms and the coefficients come from the full
   ``[M, K, P]`` log-weights;
2. each chunk is traced again from its recorded random state (bit-identical draws, checked), and
   ``backward`` runs on that chunk's surrogate with the coefficients detached; parameter gradients
   accumulate over the chunks, each particle contributing exactly once.

Every chunk sees the minibatch of the first chunk: the subsample indices a subsampled plate draws in
the first chunk are pinned for the others (:class:`_SubsamplePins`). The global random state ends
where pass 1 left it. A chunked run draws different numbers from an unchunked run with the same seed
(``C`` draws at a time instead of ``S``): statistically the same estimator, not the same stream.

Pass 1 is invisible to the model's state: the buffers of every module it runs (BatchNorm running
statistics, ``num_batches_tracked``) are restored in place after it (:class:`_PassOneModules`). When
pass 1 creates parameters (a lazy ``pyro.param`` initializer, an autoguide's first call, a lazy
module), it is run once more from a fresh recorded state, so that pass 2 (which finds them existing)
replays the same draws. Two module kinds cannot be made exact and are warned about once per loss:

- a module whose buffers change in a forward in training mode (BatchNorm) is updated once per chunk
  in pass 2, ``ceil(S / C)`` times with per-chunk statistics, where the unchunked loss updates it
  once with the statistics of all particles;
- a ``torch.nn.Dropout*`` module in training mode draws one mask per chunk instead of one per step,
  so the particles of different chunks see different guides: a different estimator than the
  unchunked loss, not only a different random stream (``torch.nn.functional.dropout`` called
  directly is not detected).

Cost: about two forward passes and one backward pass per step (pass 1 is a forward without graph).
Memory: one chunk's graph plus ``[S, P]`` log-weights and coefficients.

References
----------
.. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
.. [2] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators for
   Monte Carlo Objectives", ICLR 2019.
.. [3] A. Mnih, D. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from pyro_vi_ext.infer import _validation
from pyro_vi_ext.infer._gradients import (
    DregAliases,
    leave_one_out_signals,
    needs_detached_guide,
)
from pyro_vi_ext.infer._random_state import GlobalRandomState
from pyro_vi_ext.infer._validation import ParticleChunkingError
from pyro_vi_ext.infer._weights import PARTICLE_PLATE, ParticleWeights, trace_particles

if TYPE_CHECKING:
    from pyro_vi_ext.infer._loss_base import BoundELBO

#: tolerance of the check that pass 2 reproduced pass 1's log-weights (a different random stream
#: gives differences of order one; rounding of the same operations gives none on CPU)
_REPLAY_RTOL, _REPLAY_ATOL = 1e-4, 1e-4


def check_particle_chunk_size(particle_chunk_size: object, jit: bool | str) -> int | None:
    """Validate the ``particle_chunk_size`` argument of a bound loss.

    Parameters
    ----------
    particle_chunk_size : object
        What the user passed: ``None`` (no chunking) or a positive ``int``.
    jit : bool or str
        The loss's ``jit`` option; chunking cannot be compiled (``True`` or ``"inductor"``).

    Returns
    -------
    int or None
        The chunk size.

    Raises
    ------
    ValueError
        If it is not ``None`` or a positive ``int``.
    ParticleChunkingError
        If ``jit`` is also set.

    Examples
    --------
    >>> check_particle_chunk_size(50, jit=False)
    50
    """
    if particle_chunk_size is None:
        return None
    if (
        isinstance(particle_chunk_size, bool)
        or not isinstance(particle_chunk_size, int)
        or particle_chunk_size < 1
    ):
        raise ValueError(
            f"particle_chunk_size must be None (no chunking) or a positive int, got "
            f"{particle_chunk_size!r}"
        )
    if jit:
        raise ParticleChunkingError(
            f"particle_chunk_size cannot be combined with jit={jit!r}: the compiled path traces "
            "one graph of all particles, while chunking replays the particles chunk by chunk and "
            "runs backward per chunk. Use jit=False with particle_chunk_size, or "
            f"particle_chunk_size=None with jit={jit!r}."
        )
    return int(particle_chunk_size)


def differentiable_loss_refusal(loss: BoundELBO) -> ParticleChunkingError:
    """Return the error ``differentiable_loss`` raises when the particles are split in chunks.

    Parameters
    ----------
    loss : BoundELBO
        A loss whose chunk size is below its particle count.

    Returns
    -------
    ParticleChunkingError
        Naming the option and the alternatives.
    """
    name = type(loss).__name__
    total = loss.num_outer * loss.num_particles
    return ParticleChunkingError(
        f"{name}(particle_chunk_size={loss.particle_chunk_size}) splits its {total} particles "
        "into chunks and runs backward chunk by chunk inside loss_and_grads, so "
        "differentiable_loss cannot return one differentiable tensor without holding every "
        "particle's graph. Use loss_and_grads (pyro.infer.SVI and pyro_vi_ext.fit do), or "
        f"particle_chunk_size=None (or >= {total}) for a differentiable loss (ELBOModule, a "
        "plain torch optimizer)."
    )


class _SubsamplePins(Messenger):
    """Give every chunk the subsample indices its plates drew in the first chunk.

    While :attr:`pinning` is False the indices of every subsampled plate are recorded (first value
    per plate name); while True a plate that would draw fresh indices gets the recorded ones. Plates
    whose indices are given (``subsample=``) or replayed (the model replays the guide's) are left
    alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.indices: dict[str, torch.Tensor] = {}
        self.pinning = False

    def _pyro_sample(self, msg) -> None:
        if (
            self.pinning
            and _draws_random_indices(msg)
            and msg["value"] is None
            and msg["name"] in self.indices
        ):
            msg["value"] = self.indices[msg["name"]]

    def _pyro_post_sample(self, msg) -> None:
        if not self.pinning and _draws_random_indices(msg):
            self.indices.setdefault(msg["name"], msg["value"])


def _draws_random_indices(msg) -> bool:
    """Whether a message draws a plate's random subsample (not the particle plate, not all)."""
    fn = msg["fn"]
    return (
        isinstance(fn, _Subsample)
        and msg["name"] != PARTICLE_PLATE
        and fn.subsample_size is not None
        and fn.subsample_size < fn.size
    )


@dataclass(frozen=True)
class _PointScale:
    """What the reported terms need from a chunk's :class:`ParticleWeights` (no tensors kept)."""

    scale: float
    points_represented: float


class _PassOneModules:
    """While entered: note every module that runs (a global forward pre-hook) and its buffers.

    On a module's first forward its buffers are recorded (the tensor and a copy), whether it has
    uninitialized (lazy) parameters, and whether it is a dropout module in training mode.
    :meth:`restore` copies the recorded values back in place, so pass 1 leaves no module state.
    """

    def __init__(self) -> None:
        self.saved: dict[int, tuple[torch.nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]]
        self.saved = {}
        self.lazy_parameters = False
        self.dropout: list[str] = []
        self._handle = None

    def _pre_hook(self, module: torch.nn.Module, inputs: object) -> None:
        if id(module) in self.saved:
            return
        buffers = {
            name: (buffer, buffer.detach().clone())
            for name, buffer in module._buffers.items()
            if buffer is not None
            and not isinstance(buffer, torch.nn.parameter.UninitializedTensorMixin)
        }
        self.saved[id(module)] = (module, buffers)
        if any(
            isinstance(parameter, torch.nn.parameter.UninitializedParameter)
            for parameter in module.parameters(recurse=False)
        ):
            self.lazy_parameters = True
        dropout = torch.nn.modules.dropout._DropoutNd
        if isinstance(module, dropout) and module.training and module.p > 0:
            self.dropout.append(type(module).__name__)

    def __enter__(self) -> _PassOneModules:
        register = torch.nn.modules.module.register_module_forward_pre_hook
        self._handle = register(self._pre_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._handle = None

    def stateful(self) -> list[str]:
        """Return the class names of the modules whose buffers changed since their first run."""
        names = []
        for module, buffers in self.saved.values():
            for name, (buffer, copy) in buffers.items():
                current = module._buffers.get(name)
                if current is not buffer or not torch.equal(buffer, copy):
                    names.append(type(module).__name__)
                    break
        return names

    def restore(self) -> None:
        """Put every recorded buffer back, in place (the same tensor objects as before)."""
        with torch.no_grad():
            for module, buffers in self.saved.values():
                for name, (buffer, copy) in buffers.items():
                    buffer.copy_(copy)
                    module._buffers[name] = buffer


def _warn_once(loss: BoundELBO, kind: str, class_names: list[str]) -> None:
    """Warn about what chunking cannot make exact, once per loss and module class."""
    warned = loss.__dict__.setdefault("_chunking_warned", set())
    for class_name in dict.fromkeys(class_names):
        if (kind, class_name) in warned:
            continue
        warned.add((kind, class_name))
        name = type(loss).__name__
        if kind == "stateful":
            problem = (
                f"a {class_name} module updates its running statistics (buffers) in training mode: "
                f"{name}(particle_chunk_size={loss.particle_chunk_size}) updates them once per "
                "chunk, with each chunk's statistics, not once per step with all particles' as "
                "the unchunked loss does"
            )
        else:
            problem = (
                f"a {class_name} module in training mode draws one mask per chunk under "
                f"{name}(particle_chunk_size={loss.particle_chunk_size}), not one per step, so "
                "the particles of different chunks see different guides: a different estimator "
                "from the unchunked loss"
            )
        warnings.warn(
            f"{problem}. Put the module in eval mode for the loss, or use "
            "particle_chunk_size=None for the unchunked estimator.",
            UserWarning,
            stacklevel=4,
        )


def _chunks(total: int, chunk_size: int) -> list[tuple[int, int]]:
    """Return the ``[start, stop)`` particle ranges of ``total`` particles, ``chunk_size`` each."""
    return [(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def _trace_chunk(
    loss: BoundELBO,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    size: int,
    nesting: int,
    latent_hook: DregAliases | None,
) -> ParticleWeights:
    """Trace one chunk of ``size`` particles exactly as the unchunked loss traces all of them."""
    detach = needs_detached_guide(loss.estimator)
    return trace_particles(
        model,
        guide,
        args,
        kwargs,
        num_particles=size,
        plate_nesting=nesting,
        detach_guide_parameters=detach,
        latent_hook=latent_hook,
        require_rsample=loss.estimator if detach else None,
        # a chunk of one particle keeps its (size-1) plate: the model sees the layout of the
        # unchunked run
        vectorize=loss.vectorize_particles,
        linear_in_log_weights=loss.is_linear_in_log_weights(),
        structure_cache=loss.structure_cache(),
    )


def _check_chunkable(loss: BoundELBO) -> None:
    refusal = loss.chunking_refusal()
    if refusal is not None:
        raise ParticleChunkingError(refusal)


def _first_pass(
    loss: BoundELBO,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    pins: _SubsamplePins,
    record_states: bool,
) -> tuple[torch.Tensor, _PointScale, bool, list[GlobalRandomState]]:
    """Pass 1: the ``[S, P]`` log-weights chunk by chunk without graph (and the random states)."""
    nesting = loss._model_plate_nesting(model, guide, args, kwargs)
    total = loss.num_outer * loss.num_particles
    store = pyro.get_param_store()
    modules = _PassOneModules()
    try:
        # a second attempt only when the first created parameters: their initializers drew random
        # numbers that pass 2, finding the parameters in place, would not draw
        for _attempt in range(2 if record_states else 1):
            names = set(store.keys())
            modules.lazy_parameters = False
            pins.indices.clear()
            rows, states = [], []
            point_scale, has_score_sites = None, False
            with torch.no_grad(), modules:
                for index, (start, stop) in enumerate(_chunks(total, loss.particle_chunk_size)):
                    if record_states:
                        states.append(GlobalRandomState.capture())
                    pins.pinning = index > 0
                    with pins:
                        weights = _trace_chunk(
                            loss, model, guide, args, kwargs, stop - start, nesting, None
                        )
                    rows.append(weights.log_weights)
                    if point_scale is None:
                        point_scale = _PointScale(weights.scale, weights.points_represented)
                        has_score_sites = bool(weights.site_scores)
                    del weights  # one chunk's tensors alive at a time
            if set(store.keys()) == names and not modules.lazy_parameters:
                break
            modules.restore()  # the rerun starts from the module state pass 2 starts from
        if record_states:
            _warn_once(loss, "stateful", modules.stateful())
        _warn_once(loss, "dropout", modules.dropout)
    finally:
        modules.restore()
    return torch.cat(rows, 0), point_scale, has_score_sites, states


def _value_and_terms(
    loss: BoundELBO, log_weights: torch.Tensor, point_scale: _PointScale
) -> torch.Tensor:
    """Return the loss's value from the full ``[M, K, P]`` log-weights and record its terms."""
    value = point_scale.scale * loss.reported_value(log_weights).sum()
    loss._record_terms(point_scale, log_weights, value)
    return value


def chunked_loss(loss: BoundELBO, model: Callable, guide: Callable, *args, **kwargs) -> float:
    """Return the loss value from the particles in chunks (pass 1 only), as a float.

    Parameters
    ----------
    loss : BoundELBO
        A loss with ``particle_chunk_size`` below ``num_outer * num_particles``.
    model, guide : callable
        The Pyro programs.
    *args, **kwargs
        Their arguments.

    Returns
    -------
    float
        The negative bound, as the unchunked ``loss`` gives it on the same draws.
    """
    _check_chunkable(loss)
    pins = _SubsamplePins()
    flat, point_scale, _, _ = _first_pass(loss, model, guide, args, kwargs, pins, False)
    log_weights = flat.reshape(loss.num_outer, loss.num_particles, -1)
    return float(-_value_and_terms(loss, log_weights, point_scale))


def chunked_loss_and_grads(
    loss: BoundELBO, model: Callable, guide: Callable, *args, **kwargs
) -> float:
    """Accumulate the exact gradient chunk by chunk (two passes) and return the loss value.

    Parameters
    ----------
    loss : BoundELBO
        A loss with ``particle_chunk_size`` below ``num_outer * num_particles``.
    model, guide : callable
        The Pyro programs.
    *args, **kwargs
        Their arguments.

    Returns
    -------
    float
        The negative bound; the parameters' ``.grad`` hold the unchunked loss's gradient on the
        same draws (added to what they held).

    Raises
    ------
    ParticleChunkingError
        If the loss cannot be chunked (:meth:`BoundELBO.chunking_refusal`), or replaying a chunk
        did not reproduce its first-pass log-weights (randomness outside the generators that are
        restored, or nondeterministic kernels).
    """
    _check_chunkable(loss)
    num_outer, num_particles = loss.num_outer, loss.num_particles
    pins = _SubsamplePins()
    flat, point_scale, has_score_sites, states = _first_pass(
        loss, model, guide, args, kwargs, pins, True
    )
    end_of_first_pass = GlobalRandomState.capture()
    log_weights = flat.reshape(num_outer, num_particles, -1)
    value = _value_and_terms(loss, log_weights, point_scale)
    if not torch.is_grad_enabled():
        return float(-value)

    bound = loss.bound()
    linear = loss.is_linear_in_log_weights()
    points = log_weights.shape[-1]
    coefficients = bound.particle_weights(log_weights).reshape(-1, points)
    # the guide surrogate is scale * mean over the M bounds of the sum over points
    multiplier = point_scale.scale / num_outer
    signals = None
    if has_score_sites and not linear:
        signals = leave_one_out_signals(bound, log_weights).reshape(-1, points)
    path_ratio = None
    use_dreg = loss.estimator == "dreg" and num_particles > 1
    if use_dreg:
        path = bound.path_weights(log_weights)
        particle = bound.particle_weights(log_weights)
        ratio = torch.where(particle > 0, path / particle, torch.zeros_like(path))
        path_ratio = ratio.reshape(-1, points)

    nesting = int(loss.max_plate_nesting)
    try:
        for index, (start, stop) in enumerate(_chunks(flat.shape[0], loss.particle_chunk_size)):
            states[index].restore()
            pins.pinning = index > 0
            aliases = DregAliases() if use_dreg else None
            with pins:
                weights = _trace_chunk(
                    loss, model, guide, args, kwargs, stop - start, nesting, aliases
                )
            chunk_log_weights = weights.log_weights
            _check_replay(chunk_log_weights.detach(), flat[start:stop], index, start, stop)
            surrogate = (coefficients[start:stop] * chunk_log_weights).sum()
            surrogate = surrogate + _score_surrogate(
                weights, None if signals is None else signals[start:stop], linear
            )
            if aliases is not None:
                _reweight_paths(aliases, path_ratio[start:stop], weights)
            surrogate = multiplier * surrogate
            if surrogate.requires_grad:
                (-surrogate).backward(retain_graph=loss.retain_graph)
            del weights, chunk_log_weights, surrogate, aliases  # free this chunk's graph
    finally:
        end_of_first_pass.restore()
    return float(-value)


def _score_surrogate(
    weights: ParticleWeights, signals: torch.Tensor | None, linear: bool
) -> torch.Tensor | float:
    r"""Return a chunk's score-function surrogate, summed (0 without such sites).

    ``K > 1``: :math:`\sum \mathrm{sg}(\sigma) \log q` with the leave-one-out signals of the full
    log-weights (VIMCO per point, as the unchunked loss). One particle per bound (``linear``): the
    Rao-Blackwellized signals of the chunk's own particles, plus the direct ``log q`` term, as the
    unchunked loss.
    """
    total: torch.Tensor | float = 0.0
    for site_score in weights.site_scores:
        if linear:
            log_q = site_score.log_q
            total = total + (site_score.log_weights.detach() * log_q).sum() + log_q.sum()
        else:
            total = total + (signals * site_score.log_q.sum(-1)).sum()
    return total


def _reweight_paths(aliases: DregAliases, ratio: torch.Tensor, weights: ParticleWeights) -> None:
    """DReG: scale the gradient reaching each latent alias by path weight / particle weight."""
    for name, site_aliases in aliases.aliases.items():
        for run, alias in enumerate(site_aliases):
            factor = weights.per_point_to_run_site(ratio, name, run)
            alias.register_hook(lambda grad, factor=factor: grad * factor)


def _check_replay(
    replayed: torch.Tensor, recorded: torch.Tensor, index: int, start: int, stop: int
) -> None:
    if torch.allclose(replayed, recorded, rtol=_REPLAY_RTOL, atol=_REPLAY_ATOL, equal_nan=True):
        return
    worst = float((replayed - recorded).abs().nan_to_num(float("inf")).max())
    raise ParticleChunkingError(
        f"particle_chunk_size: replaying chunk {index} (particles {start}..{stop - 1}) did not "
        f"reproduce its first-pass log-weights (largest difference {worst:.3g}), so the chunked "
        "gradient would not match the value. The model or guide uses randomness outside torch's, "
        "Python's and NumPy's global generators (e.g. a private torch.Generator), "
        "nondeterministic kernels, or state that changes between calls. Make it deterministic "
        "given those generators, or use particle_chunk_size=None."
    )


def guarded(method: Callable) -> Callable:
    """Return ``method`` with the loss's memory check and error translation.

    Parameters
    ----------
    method : callable
        :func:`chunked_loss` or :func:`chunked_loss_and_grads`.

    Returns
    -------
    callable
        As :func:`~pyro_vi_ext.infer._validation.guarded_differentiable_loss` wraps a loss.
    """
    return _validation.guarded_differentiable_loss(method)


guarded_chunked_loss = guarded(chunked_loss)
guarded_chunked_loss_and_grads = guarded(chunked_loss_and_grads)

__all__ = [
    "check_particle_chunk_size",
    "chunked_loss",
    "chunked_loss_and_grads",
    "differentiable_loss_refusal",
    "guarded_chunked_loss",
    "guarded_chunked_loss_and_grads",
]
