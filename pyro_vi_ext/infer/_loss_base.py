"""Shared by every loss of the package: the Pyro ELBO contract on top of differentiable_loss."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from pyro.infer import ELBO

from pyro_vi_ext.infer import _validation
from pyro_vi_ext.infer._weights import guess_plate_nesting


class ParticleELBO(ELBO):
    """Base for losses whose maths lives in :meth:`differentiable_loss`.

    All particles are vectorized on one plate to the left of the model's plates, so the model must
    have static structure. ``loss`` and ``loss_and_grads`` are derived from ``differentiable_loss``
    and therefore agree with it. After each call, :attr:`last_terms` holds the reported terms
    (nats per data point) as plain floats.
    """

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
    ):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if not vectorize_particles:
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
            vectorize_particles=True,
            retain_graph=retain_graph,
        )
        # the model's own nesting, without the particle plate (guessed on first use when None)
        self.max_plate_nesting = (
            float("inf") if max_plate_nesting is None else int(max_plate_nesting)
        )
        self.last_terms: dict[str, float] = {}
        self._checked_memory: set = set()  # (model, guide, particles) pairs whose memory fits

    def _model_plate_nesting(self, model: Callable, guide: Callable, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO abstract method
        raise NotImplementedError(
            f"{type(self).__name__} computes its traces in one vectorized run"
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss value (negative bound) as a float, computed without building a graph."""
        _validation.check_elbo_instance(self, "loss")
        with torch.no_grad():
            value = self.differentiable_loss(model, guide, *args, **kwargs)
        return _checked_float(value)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Accumulate the estimator's gradients into the parameters and return the loss value."""
        _validation.check_elbo_instance(self, "loss_and_grads")
        value = self.differentiable_loss(model, guide, *args, **kwargs)
        if value.requires_grad:
            value.backward(retain_graph=self.retain_graph)
        else:
            warnings.warn(
                "The loss does not depend on any trainable parameter; no gradient was computed.",
                stacklevel=2,
            )
        return _checked_float(value)


def _checked_float(value: torch.Tensor) -> float:
    number = float(value.detach())
    if not math.isfinite(number):
        warnings.warn(f"Encountered non-finite loss {number}", stacklevel=3)
    return number
