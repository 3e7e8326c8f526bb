"""Shared by every loss of the package: the Pyro ELBO contract on top of ``differentiable_loss``.

:class:`ParticleELBO` derives ``loss`` and ``loss_and_grads`` from ``differentiable_loss``.
:class:`BoundELBO` composes the three layers of an importance-weighted loss: the log-weights of
:func:`~pyro_vi_ext.infer._weights.trace_particles`, a :class:`~pyro_vi_ext.infer._bounds.Bound`
and a gradient estimator of :mod:`pyro_vi_ext.infer._gradients`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from pyro.infer import ELBO

from pyro_vi_ext.infer import _chunked, _validation
from pyro_vi_ext.infer._bounds import Bound, effective_sample_size, elbo_bound
from pyro_vi_ext.infer._compiled import check_jit_option, compiled_path
from pyro_vi_ext.infer._gradients import (
    DregAliases,
    Estimator,
    check_estimator,
    needs_detached_guide,
    score_function_surrogate,
    surrogate_loss,
)
from pyro_vi_ext.infer._weights import ParticleWeights, guess_plate_nesting, trace_particles

_MAX_CACHED_STRUCTURES = 256


class ParticleELBO(ELBO):
    """Base for losses whose maths lives in :meth:`differentiable_loss`.

    ``loss`` and ``loss_and_grads`` are derived from ``differentiable_loss`` and therefore agree
    with it. After each call, :attr:`last_terms` holds the reported terms (nats per data point) as
    plain floats; a loss may keep what they are computed from (detached tensors of the step) and
    compute them when :attr:`last_terms` is first read, so a step whose terms are not read pays
    nothing for them.

    Parameters
    ----------
    num_particles : int
        Particles per estimate.
    max_plate_nesting : int or None
        The model's plate nesting, without the particle plate; guessed by one extra run of model
        and guide when omitted.
    vectorize_particles : bool
        Draw the particles on one vectorized plate (True) or in a loop; subclasses that cannot
        loop (:attr:`supports_sequential_particles` False) refuse False.
    retain_graph : bool or None
        Passed to ``backward`` in :meth:`loss_and_grads`.
    jit : bool or {"inductor"}
        Compile model, guide and bound with ``torch.jit.trace`` once per signature (new argument
        shapes, a new model or guide, gradients on/off recompile); same values and gradients as
        the eager path on the same draws, eager fallback with a warning when tracing fails.
        ``"inductor"``: capture loss and gradients as one graph and compile it with torch
        inductor (fused kernels; seconds to compile each signature, needs a C++ compiler, else
        the captured graph runs uncompiled). Values the model or guide reads from a global or
        a closure (e.g. a KL-annealing factor in ``poutine.scale``) are frozen at the first call:
        pass them as arguments. See :mod:`pyro_vi_ext.infer._compiled`.
    """

    #: whether ``vectorize_particles=False`` (a loop over particles) is supported
    supports_sequential_particles = False

    def __new__(cls, *args, **kwargs):
        _validation.check_constructor_arguments(cls, args, kwargs)
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "differentiable_loss" in cls.__dict__:
            cls.differentiable_loss = _validation.guarded_differentiable_loss(
                cls.differentiable_loss
            )

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        jit: bool | str = False,
    ):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if not vectorize_particles and not self.supports_sequential_particles:
            raise ValueError(
                f"{type(self).__name__} needs vectorize_particles=True: its per-data-point "
                "reductions pair particles drawn for the same minibatch, which a Python loop over "
                "particles cannot guarantee under subsampling."
            )
        if max_plate_nesting is not None and (
            max_plate_nesting == float("inf")
            or not float(max_plate_nesting).is_integer()
            or max_plate_nesting < 0
        ):
            if max_plate_nesting != float("inf"):
                raise ValueError(
                    f"max_plate_nesting must be a non-negative int, got {max_plate_nesting!r}"
                )
            max_plate_nesting = None
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf"),
            vectorize_particles=bool(vectorize_particles),
            retain_graph=retain_graph,
        )
        # the model's own nesting, without the particle plate (guessed on first use when None)
        self.max_plate_nesting = (
            float("inf") if max_plate_nesting is None else int(max_plate_nesting)
        )
        self.last_terms = {}
        self._checked_memory: set = set()  # (model, guide, particles) pairs whose memory fits
        # what only changes with the model's structure (checks passed, detachability), keyed on it
        self._structure_cache: dict = {}
        self.jit = check_jit_option(jit)
        self._compiled = compiled_path(self.jit)
        self._deferred_terms: dict[str, torch.Tensor] | None = None
        self.tracing = False  # True while torch.jit.trace records differentiable_loss

    # -- the compiled path ------------------------------------------------------------------
    def compile_state(self) -> tuple:
        """Return the loss state a compiled trace depends on (default: none).

        Subclasses whose maths changes between calls (annealed weights) return it, so that a
        change recompiles instead of replaying stale constants.
        """
        return ()

    def compile_refusal(self) -> str | None:
        """Return why this loss's computation cannot be traced (``None``: it can)."""
        return None

    @contextlib.contextmanager
    def deferred_terms(self):
        """Collect the reported terms as tensors (the compiled path returns them from its graph).

        Yields
        ------
        dict
            Filled with ``{name: 0-d tensor}`` by the loss during the call.
        """
        terms: dict[str, torch.Tensor] = {}
        saved = self._deferred_terms, self.tracing
        self._deferred_terms, self.tracing = terms, True
        try:
            yield terms
        finally:
            self._deferred_terms, self.tracing = saved

    #: what the terms of the last call are computed from on first read (see :attr:`last_terms`)
    _pending_terms: PendingTerms | None = None

    @property
    def last_terms(self) -> dict[str, float]:
        """The reported terms of the last call (nats per data point), computed on first read."""
        pending = self._pending_terms
        if pending is not None:
            self._pending_terms = None
            self._last_terms = pending.evaluate()
        return self._last_terms

    @last_terms.setter
    def last_terms(self, terms: dict[str, float]) -> None:
        self._pending_terms = None
        self._last_terms = terms

    def _set_pending_terms(self, pending: PendingTerms) -> None:
        """Store what the terms are computed from; :attr:`last_terms` evaluates it when read.

        A step that nobody reads the terms of then pays neither their small tensor operations
        nor the float reads (one synchronization each on an accelerator).
        """
        self._last_terms = {}
        self._pending_terms = pending

    def _set_terms(self, terms: dict[str, torch.Tensor | float]) -> None:
        """Store the reported terms: as floats, or as tensors while they are deferred."""
        if self._deferred_terms is not None:
            for name, term in terms.items():
                self._deferred_terms[name] = torch.as_tensor(term).detach()
        else:
            self.last_terms = {name: float(term) for name, term in terms.items()}

    def set_compiled_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Set :attr:`last_terms` from the term tensors a compiled graph returned."""
        self.last_terms = {name: float(term) for name, term in terms.items()}

    def structure_cache(self) -> dict:
        """Return the per-structure cache handed to ``trace_particles`` (bounded in size).

        Keys name the model, guide and their trace structure, so a new structure (new shapes, new
        sites) is checked afresh; the cache is emptied when it holds many structures (e.g. a
        batch size that changes every step).
        """
        if len(self._structure_cache) > _MAX_CACHED_STRUCTURES:
            self._structure_cache.clear()
        return self._structure_cache

    def _model_plate_nesting(self, model: Callable, guide: Callable, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO abstract method
        raise NotImplementedError(
            f"{type(self).__name__} computes its traces in one vectorized run"
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Return the loss as a scalar tensor whose gradient is the estimator (subclasses)."""
        raise NotImplementedError

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Return the loss value (negative bound) as a float, computed without building a graph."""
        _validation.check_elbo_instance(self, "loss")
        with torch.no_grad():
            value = self.differentiable_loss(model, guide, *args, **kwargs)
        return _checked_float(value)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Accumulate the estimator's gradients into the parameters and return the loss value."""
        _validation.check_elbo_instance(self, "loss_and_grads")
        value = self.differentiable_loss(model, guide, *args, **kwargs)
        if value.requires_grad:  # as Trace_ELBO: silently nothing to do without parameters
            value.backward(retain_graph=self.retain_graph)
        return _checked_float(value)


class BoundELBO(ParticleELBO):
    r"""An importance-weighted bound per data point with a chosen gradient estimator.

    Subclasses supply the :class:`~pyro_vi_ext.infer._bounds.Bound` (:meth:`bound`); this class
    traces ``M K`` particles, reshapes the log-weights to ``[M, K, P]``, takes the value
    :math:`\frac{N}{B}\sum_n \frac{1}{M}\sum_m f(\log w_{m,\cdot,n})` (subsampling factor after
    the per-point reduction) and builds the surrogate of ``estimator``.

    Parameters
    ----------
    num_particles : int
        Particles ``K`` per bound.
    num_outer : int
        Independent bounds ``M`` averaged.
    estimator : {"iwae", "stl", "dreg"}
        The gradient estimator (:mod:`pyro_vi_ext.infer._gradients`).
    max_plate_nesting, vectorize_particles, retain_graph, jit
        As for :class:`ParticleELBO`.
    particle_chunk_size : int or None
        Evaluate the ``M K`` particles ``C`` at a time in ``loss`` and ``loss_and_grads``, with
        the same value and gradient as unchunked on the same draws (:mod:`._chunked`).
    """

    #: key of the objective's value in :attr:`last_terms`
    bound_term = "bound"
    supports_sequential_particles = True

    def __init__(
        self,
        num_particles: int = 1,
        num_outer: int = 1,
        estimator: Estimator = "iwae",
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        jit: bool | str = False,
        particle_chunk_size: int | None = None,
    ):
        check_estimator(estimator)
        chunk_size = _chunked.check_particle_chunk_size(particle_chunk_size, jit)
        if not isinstance(num_outer, int) or num_outer < 1:
            raise ValueError(f"num_outer must be a positive int, got {num_outer!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            jit=jit,
        )
        self.num_outer = num_outer
        self.estimator: Estimator = estimator
        self.particle_chunk_size = chunk_size

    def splits_particles(self) -> bool:
        """Return whether ``particle_chunk_size`` is below the ``M K`` particles (chunks run)."""
        chunk_size = self.particle_chunk_size
        return chunk_size is not None and chunk_size < self.num_outer * self.num_particles

    def chunking_refusal(self) -> str | None:
        """Return why this loss's particles cannot be chunked exactly (``None``: they can).

        By default a subclass that combines its surrogates in its own way
        (:meth:`combine_surrogates`) is refused: chunking only knows the guide's surrogate.
        """
        if type(self).combine_surrogates is not BoundELBO.combine_surrogates:
            return (
                f"{type(self).__name__} overrides combine_surrogates, which particle chunking "
                "cannot split into per-particle terms; use particle_chunk_size=None."
            )
        return None

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Return the loss value as a float (chunk by chunk with ``particle_chunk_size``)."""
        _validation.check_elbo_instance(self, "loss")
        if not self.splits_particles():
            return super().loss(model, guide, *args, **kwargs)
        return _checked_float(_chunked.guarded_chunked_loss(self, model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Accumulate the gradients (in chunks with ``particle_chunk_size``), return the value."""
        _validation.check_elbo_instance(self, "loss_and_grads")
        if not self.splits_particles():
            return super().loss_and_grads(model, guide, *args, **kwargs)
        value = _chunked.guarded_chunked_loss_and_grads(self, model, guide, *args, **kwargs)
        return _checked_float(value)

    def bound(self) -> Bound:
        """Return the bound optimized (subclasses)."""
        raise NotImplementedError

    def is_linear_in_log_weights(self) -> bool:
        """Return whether value and surrogate only average log-weights (one particle per bound).

        Then the loss is an ELBO, unbiased under any subsampling, and the refusals that protect
        ``K > 1`` bounds (latents outside a subsampled plate, subsampled sequential plates) are
        lifted.
        """
        return self.num_particles == 1

    def reported_value(self, log_weights: torch.Tensor) -> torch.Tensor:
        """Return the value per point ``[P]`` reported and returned (default: the bound's mean)."""
        return self.bound().value(log_weights).mean(0)

    def reports_bound_value(self) -> bool:
        """Return whether :meth:`reported_value` is the bound's mean (computed once per call).

        True when :meth:`reported_value` is not overridden; a subclass whose override returns the
        default for its configuration says so here.
        """
        return type(self).reported_value is BoundELBO.reported_value

    def combine_surrogates(
        self,
        model: Callable,
        guide: Callable,
        weights: ParticleWeights,
        value: torch.Tensor,
        guide_surrogate: torch.Tensor,
    ) -> torch.Tensor:
        """Return the scalar surrogate from the value and the guide's surrogate.

        By default the guide's surrogate, whose gradient also reaches the model parameters.
        """
        return guide_surrogate

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """Return the negative bound as a scalar tensor whose gradient is the chosen estimator.

        Raises :class:`~pyro_vi_ext.infer._validation.ParticleChunkingError` while
        ``particle_chunk_size`` splits the particles (the chunks run in ``loss_and_grads``).
        """
        if self.splits_particles():
            raise _chunked.differentiable_loss_refusal(self)
        nesting = self._model_plate_nesting(model, guide, args, kwargs)
        num_outer, num_particles = self.num_outer, self.num_particles
        bound = self.bound()
        detach = needs_detached_guide(self.estimator)
        grad_enabled = torch.is_grad_enabled()
        # with one particle per bound every path weight equals the particle weight (both 1):
        # DReG is STL and needs no hooks
        aliases = (
            DregAliases(traceable=self.tracing)
            if self.estimator == "dreg" and grad_enabled and num_particles > 1
            else None
        )
        total = num_outer * num_particles
        weights = trace_particles(
            model,
            guide,
            args,
            kwargs,
            num_particles=total,
            plate_nesting=nesting,
            detach_guide_parameters=detach,
            latent_hook=aliases,
            require_rsample=self.estimator if detach else None,
            # one particle needs no particle plate (as Trace_ELBO): the model need not broadcast
            vectorize=self.vectorize_particles and total > 1,
            linear_in_log_weights=self.is_linear_in_log_weights(),
            structure_cache=self.structure_cache(),
        )
        log_weights = weights.log_weights.reshape(num_outer, num_particles, -1)
        guide_objective = bound.value(log_weights)  # [M, P]
        if self.reports_bound_value():
            reported = guide_objective.mean(0)  # the same tensor: computed once
        else:
            reported = self.reported_value(log_weights)
        value = reported.sum()
        if weights.scale != 1.0:  # times 1.0 is the identity (value and gradient): no op
            value = weights.scale * value
        self._record_terms(weights, log_weights, value)
        if not grad_enabled:
            return -value

        linear = self.is_linear_in_log_weights()
        for site_score in weights.site_scores:
            shape = (num_outer, num_particles, *site_score.log_q.shape[1:])
            log_q = site_score.log_q.reshape(shape)
            if linear:
                # the ELBO: each plate element's signal keeps only its own (and unrelated) terms,
                # exactly Trace_ELBO's sum_to; the direct d(-log q)/dphi of a non-reparameterized
                # site has mean zero and is dropped, as Trace_ELBO does
                guide_objective = guide_objective + score_function_surrogate(
                    bound, log_weights, log_q, site_score.log_weights.reshape(shape)
                )
                guide_objective = guide_objective + log_q.sum(-1).mean(1)
            else:
                # K > 1: per-point VIMCO (the direct term belongs to its gradient); per element
                # leave-one-out baselines were measured to raise the variance for K >= 4
                guide_objective = guide_objective + score_function_surrogate(
                    bound, log_weights, log_q.sum(-1)
                )
        if aliases is not None:
            aliases.reweight(bound, log_weights, weights.per_point_to_run_site)
            guide_objective = aliases.keep_alive(guide_objective)
        guide_surrogate = guide_objective.mean(0).sum()
        if weights.scale != 1.0:
            guide_surrogate = weights.scale * guide_surrogate
        surrogate = self.combine_surrogates(model, guide, weights, value, guide_surrogate)
        return surrogate_loss(value, surrogate)

    def _record_terms(self, weights: ParticleWeights, log_weights, value) -> None:
        terms = _BoundTerms(
            self.bound_term,
            value.detach(),
            log_weights.detach(),
            weights.scale,
            weights.points_represented,
        )
        if self._deferred_terms is not None:  # compiled: the terms are outputs of the graph
            with torch.no_grad():
                self._set_terms(terms.tensors())
        else:
            self._set_pending_terms(terms)


class PendingTerms(Protocol):
    """What a loss's terms are computed from when :attr:`ParticleELBO.last_terms` is read."""

    def evaluate(self) -> dict[str, float]:
        """Return the terms as floats."""
        ...


@dataclass(frozen=True)
class _BoundTerms:
    """A bound loss's reported terms, kept as the detached tensors they are computed from.

    The tensors are results of the step (no parameter, no in-place update touches them), so a
    read after later steps still gives this step's terms.
    """

    bound_term: str
    value: torch.Tensor
    log_weights: torch.Tensor
    scale: float
    points_represented: float

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the terms as 0-d tensors."""
        per_point = self.scale / self.points_represented
        return {
            self.bound_term: self.value / self.points_represented,
            "elbo": elbo_bound(self.log_weights).mean(0).sum() * per_point,
            "ess": effective_sample_size(self.log_weights).mean(),
        }

    def evaluate(self) -> dict[str, float]:
        """Return the terms as floats."""
        with torch.no_grad():
            return {name: float(term) for name, term in self.tensors().items()}


def _checked_float(value: torch.Tensor | float) -> float:
    number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(number):
        warnings.warn(f"Encountered non-finite loss {number}", stacklevel=3)
    return number


__all__ = ["BoundELBO", "ParticleELBO", "PendingTerms"]
